#!/usr/bin/env bash
# What a new user gets in a fresh virtual environment, checked from outside the source tree:
# - the prebuilt-kernel wheel (jit/) packs the modules of AOT_DIR without compiling again, has
#   py3-none-manylinux tags, the CUDA major in its name, Requires-Dist fusedcomm==<version>,
#   and stays under 50 MB per architecture;
# - installed with fusedcomm into a fresh venv, `import fusedcomm; fusedcomm.warmup()` with
#   FUSEDCOMM_NO_JIT=1 starts no compiler (FUSEDCOMM_NVCC and PATH's nvcc record any call);
# - on a CPU-only torch the GPU entry points raise fusedcomm.CudaUnavailableError;
# - logging: FUSEDCOMM_LOGLEVEL=INFO shows where modules load from; TORCH_CUDA_ARCH_LIST is
#   honoured when FUSEDCOMM_CUDA_ARCH_LIST is unset;
# - the fusedcomm command: --version, doctor listing every configured arch, bench refusing to
#   run without GPUs.
# Usage: scripts/check_fresh_venv.sh AOT_DIR   (scripts/test.sh passes the modules it built)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
aot=$(cd "${1:?usage: $0 AOT_DIR}" && pwd)
py=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" "$root/jit/build" "$root"/jit/*.egg-info' EXIT
fail() { echo "check_fresh_venv: FAIL: $*" >&2; exit 1; }

echo "-- wheel from $aot (no compiler: FUSEDCOMM_JIT_CACHE_FROM)"
FUSEDCOMM_JIT_CACHE_FROM="$aot" "$py" -m pip wheel -q --disable-pip-version-check \
  --no-build-isolation --no-deps "$root/jit" -w "$tmp/dist" >/dev/null
wheel=$(ls "$tmp"/dist/fusedcomm_jit_cache_cu*.whl)
"$py" - "$wheel" "$root/python/fusedcomm/_version.py" <<'PY'
import re, sys, zipfile
from pathlib import Path
wheel, version_file = sys.argv[1], sys.argv[2]
version = re.search(r'__version__ = "([^"]+)"', Path(version_file).read_text()).group(1)
name = Path(wheel).name
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    info = next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))
    metadata, tags = z.read(meta).decode(), z.read(info).decode()
    archs = {n.split("/")[2] for n in z.namelist() if n.endswith(".so")} - {"host"}
problems = []
tag = re.findall(r"^Tag: (.+)$", tags, re.M)
if len(tag) != 1 or not re.fullmatch(r"py3-none-manylinux_\d+_\d+_(x86_64|aarch64)", tag[0]):
    problems.append(f"tags {tag}, expected one py3-none-manylinux_X_Y_<machine>")
if not re.search(r"^Name: fusedcomm-jit-cache-cu\d+$", metadata, re.M):
    problems.append("name does not carry the CUDA major")
if f"Requires-Dist: fusedcomm=={version}" not in metadata:
    problems.append(f"no Requires-Dist: fusedcomm=={version}")
size_mb = Path(wheel).stat().st_size / 2**20
if size_mb > 50 * max(1, len(archs)):
    problems.append(f"{size_mb:.1f} MB for {len(archs)} arch(s): over 50 MB per arch")
if problems:
    sys.exit("check_fresh_venv: FAIL: " + "; ".join(problems))
print(f"   {name}: {size_mb:.1f} MB for {sorted(archs)}; {tag[0]}; fusedcomm=={version}")
PY

echo "-- fresh venv: install both wheels (--no-deps; torch etc. come from the current env)"
"$py" -m venv --system-site-packages "$tmp/venv"
vpy="$tmp/venv/bin/python"
if ! (cd "$tmp" && env -u PYTHONPATH "$vpy" -c "import torch, tvm_ffi, filelock" 2>/dev/null); then
  # the dependencies live in this venv rather than in the system: make them visible (plain
  # path entries only; this env's .pth hooks, such as an editable fusedcomm, stay out)
  "$py" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))" \
    > "$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/deps.pth"
fi
mkdir "$tmp/src"
git -C "$root" ls-files -co --exclude-standard -z | (cd "$root" && tar --null -T - -cf - 2>/dev/null) \
  | tar -C "$tmp/src" -xf -
vpip() { (cd "$tmp" && env -u PYTHONPATH "$vpy" -m pip install -q --disable-pip-version-check --no-deps "$@"); }
"$py" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps "$tmp/src" \
  -w "$tmp/dist" >/dev/null 2>&1
vpip "$wheel" "$tmp"/dist/fusedcomm-*.whl >/dev/null

# Run in the fresh venv, away from the source tree, with nothing but the wheel to load from.
printf '#!/bin/sh\necho "$0 $*" >> %s/nvcc-calls\nexit 1\n' "$tmp" > "$tmp/nvcc"
chmod +x "$tmp/nvcc"
run() {
  (cd "$tmp" && env -u PYTHONPATH -u FUSEDCOMM_AOT_DIR -u FUSEDCOMM_CUDA_ARCH_LIST \
     -u TORCH_CUDA_ARCH_LIST -u FUSEDCOMM_LOGLEVEL PATH="$tmp:$tmp/venv/bin:$PATH" \
     FUSEDCOMM_CACHE_DIR="$tmp/cache" FUSEDCOMM_NVCC="$tmp/nvcc" "$@")
}

echo "-- import + warmup with FUSEDCOMM_NO_JIT=1: no compiler call"
run env FUSEDCOMM_NO_JIT=1 FUSEDCOMM_CUDA_ARCH_LIST=9.0a "$vpy" -c '
import fusedcomm, fusedcomm_jit_cache
assert fusedcomm.__file__.startswith(__import__("sys").prefix), fusedcomm.__file__
names = fusedcomm.warmup()
print("   warmup loaded", len(names), "module(s) from", fusedcomm_jit_cache.MODULE_DIR)'
[ ! -e "$tmp/nvcc-calls" ] || fail "compiler called: $(cat "$tmp/nvcc-calls")"

echo "-- TORCH_CUDA_ARCH_LIST=9.0 alone picks 9.0a; FUSEDCOMM_LOGLEVEL=INFO says where modules load from"
log=$(run env FUSEDCOMM_NO_JIT=1 TORCH_CUDA_ARCH_LIST="9.0" FUSEDCOMM_LOGLEVEL=INFO "$vpy" -c '
import fusedcomm; fusedcomm.warmup()' 2>&1)
sed -n '1,3s/^/   /p' <<<"$log"
grep -q "fusedcomm: loaded .* from .*fusedcomm_jit_cache" <<<"$log" || fail "no INFO load line"
quiet=$(run env FUSEDCOMM_NO_JIT=1 FUSEDCOMM_CUDA_ARCH_LIST=9.0a "$vpy" -c '
import fusedcomm; fusedcomm.warmup()' 2>&1)
[ -z "$quiet" ] || fail "library use is not quiet by default: $quiet"
[ ! -e "$tmp/nvcc-calls" ] || fail "compiler called: $(cat "$tmp/nvcc-calls")"

if run "$vpy" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)'; then
  echo "-- CPU-only torch: GPU entry points raise CudaUnavailableError"
  run "$vpy" -c '
import torch, fusedcomm as comm
calls = [(comm.create_shared_buffer, (4096,)),
         (comm.pack_strided_memory, (1 << 20, 64, 64, 2, torch.float32, 0)),
         (comm.trtllm_lamport_initialize, (1 << 20, 16, torch.float16)),
         (comm.trtllm_lamport_initialize_all, (1 << 20, 1 << 20, 1 << 20, 16, torch.float16))]
for fn, args in calls:
    try:
        fn(*args)
    except comm.CudaUnavailableError as e:
        assert isinstance(e, RuntimeError) and fn.__name__ in str(e), e
        message = str(e)
    else:
        raise SystemExit(f"{fn.__name__} did not raise")
print("   e.g.", message)'
fi

echo "-- the fusedcomm command"
version=$(run fusedcomm --version)
echo "   $version"
[[ "$version" == "fusedcomm "* ]] || fail "--version printed '$version'"
doctor=$(run env FUSEDCOMM_CUDA_ARCH_LIST="9.0a 10.0a" fusedcomm doctor)
grep -q "^  9.0a (from FUSEDCOMM_CUDA_ARCH_LIST)" <<<"$doctor" || fail "doctor misses 9.0a"
grep -q "^  10.0a (from FUSEDCOMM_CUDA_ARCH_LIST)" <<<"$doctor" || fail "doctor misses 10.0a"
if run "$vpy" -c 'import sys, torch; sys.exit(0 if torch.cuda.device_count() < 2 else 1)'; then
  set +e
  out=$(run fusedcomm bench 2>&1)
  rc=$?
  set -e
  echo "   bench: $out (exit $rc)"
  [ "$rc" -ne 0 ] || fail "bench without GPUs exited 0"
fi
echo "check_fresh_venv: ok"
