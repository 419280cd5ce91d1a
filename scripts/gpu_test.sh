#!/usr/bin/env bash
# On a GPU host: the benchmarks, then every GPU (and MPI) test; results and a summary in OUTDIR.
# With one GPU (or FUSEDCOMM_TEST_SHARE_GPU=1) the multi-rank tests run with ranks sharing
# GPU 0 (correctness only) and no benchmark is timed.
# Uses prebuilt modules from FUSEDCOMM_AOT_DIR, or from .gpu-bundle/kernels when present, and
# the wheels in .gpu-bundle/wheels for packages the host lacks (no registry there).
#   usage: scripts/gpu_test.sh OUTDIR
set -uo pipefail
out=${1:?usage: scripts/gpu_test.sh OUTDIR [pytest args]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
if ls .gpu-bundle/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fc-site .gpu-bundle/wheels/*.whl
  export PYTHONPATH=/tmp/fc-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${FUSEDCOMM_AOT_DIR:-}" ] && [ -d .gpu-bundle/kernels ]; then
  chmod -R go-w .gpu-bundle/kernels
  export FUSEDCOMM_AOT_DIR="$root/.gpu-bundle/kernels"
fi
py=python3
gpus=$($py -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
shared=0
if [ "$gpus" -lt 2 ] || [ "${FUSEDCOMM_TEST_SHARE_GPU:-0}" != "0" ]; then
  shared=1  # multi-rank tests put two ranks on one GPU: protocols run, timings mean nothing
fi
# World sizes to run the multi-rank tests at (FUSEDCOMM_GPU_TEST_WORLDS="2 4" adds a second pass).
worlds=${FUSEDCOMM_GPU_TEST_WORLDS:-2}
# Test paths (default: the whole suite); FUSEDCOMM_GPU_TESTS="tests/test_a.py tests/test_b.py" picks some.
read -r -a paths <<< "${FUSEDCOMM_GPU_TESTS:-tests}"
$py -m fusedcomm doctor 2>&1 | tee "$out/doctor.txt"
bench_rc=0
if [ "$shared" = 1 ]; then
  echo "== benchmarks: not run ($gpus GPU(s) visible; ranks share GPU 0: correctness only)"
  bench_rc=skip
else
  echo "== benchmarks"
  $py -m fusedcomm bench --json "$out/bench.json" --markdown "$out/bench.md" --plot "$out/bench.png" \
    2>&1 || bench_rc=$?
fi
test_rc=0
for w in $worlds; do
  echo "== GPU and MPI tests, world size $w$([ "$shared" = 1 ] && echo ', ranks share GPU 0')"
  $py -m pytest -m "gpu or mpi" --world-size "$w" -v -rfEs --durations=12 -p no:cacheprovider \
    --junitxml="$out/junit-w$w.xml" "$@" "${paths[@]}" 2>&1 | tee "$out/pytest-w$w.log"
  [ "${PIPESTATUS[0]}" = 0 ] || test_rc=1
done
$py - "$out" "$bench_rc" "$shared" "$gpus" $worlds <<'PY' | tee "$out/summary.txt"
import collections, json, sys, xml.etree.ElementTree as ET
out, bench_rc, shared, gpus, worlds = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5:]
total = failed = skipped = 0
reasons = collections.Counter()
for w in worlds:
    try:
        root = ET.parse(f"{out}/junit-w{w}.xml").getroot()
    except (OSError, ET.ParseError):
        failed += 1
        print(f"world size {w}: no test report (junit-w{w}.xml missing or unreadable)")
        continue
    suites = [root] if root.tag == "testsuite" else list(root)
    total += sum(int(s.get("tests", 0)) for s in suites)
    failed += sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped += sum(int(s.get("skipped", 0)) for s in suites)
    for case in root.iter("testcase"):
        skip = case.find("skipped")
        if skip is not None:
            reasons[f"w{w}: {skip.get('message', '')[:160]}"] += 1
passed = total - failed - skipped
for why, count in sorted(reasons.items()):
    print(f"skipped {count}: {why}")
if shared:
    print(f"mode: {gpus} GPU(s) visible; ranks share GPU 0: correctness only (no benchmarks, no timings)")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    sys.exit(1 if failed else 0)
try:
    rows = json.load(open(f"{out}/bench.json")).get("allreduce", [])
    exact = bool(rows) and all(r.get("exact_vs_nccl") for r in rows)
except (OSError, ValueError):
    exact = False
bench_ok = bench_rc == "0" and exact
print(f"mode: {gpus} GPUs, one per rank")
print(f"benchmarks: {'ok' if bench_ok else 'FAILED'} (exit {bench_rc}, results exact vs NCCL: {exact})")
print(f"{passed + bench_ok} passed, {failed + (not bench_ok)} failed, {skipped} skipped")
sys.exit(1 if failed or not bench_ok else 0)
PY
summary_rc=${PIPESTATUS[0]}
[ "$summary_rc" = 0 ] && [ "$test_rc" = 0 ] || exit 1
