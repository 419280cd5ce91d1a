#!/usr/bin/env bash
# On a GPU host: the benchmarks, then every GPU (and MPI) test; results and a summary in OUTDIR.
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
$py -m fusedcomm doctor 2>&1 | tee "$out/doctor.txt"
echo "== benchmarks"
bench_rc=0
$py -m fusedcomm bench --json "$out/bench.json" --markdown "$out/bench.md" --plot "$out/bench.png" \
  2>&1 || bench_rc=$?
echo "== GPU and MPI tests"
$py -m pytest -m "gpu or mpi" -v -rfEs --durations=12 -p no:cacheprovider --junitxml="$out/junit.xml" "$@" tests \
  2>&1 | tee "$out/pytest.log"
$py - "$out" "$bench_rc" <<'PY' | tee "$out/summary.txt"
import json, sys, xml.etree.ElementTree as ET
out, bench_rc = sys.argv[1], int(sys.argv[2])
try:
    suites = ET.parse(f"{out}/junit.xml").getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
except (OSError, ET.ParseError):
    total, failed, skipped = 0, 1, 0
passed = total - failed - skipped
try:
    rows = json.load(open(f"{out}/bench.json")).get("allreduce", [])
    exact = bool(rows) and all(r.get("exact_vs_nccl") for r in rows)
except (OSError, ValueError):
    exact = False
bench_ok = bench_rc == 0 and exact
print(f"benchmarks: {'ok' if bench_ok else 'FAILED'} (exit {bench_rc}, results exact vs NCCL: {exact})")
print(f"{passed + bench_ok} passed, {failed + (not bench_ok)} failed, {skipped} skipped")
sys.exit(1 if failed or not bench_ok else 0)
PY
exit "${PIPESTATUS[0]}"
