#!/usr/bin/env bash
# Set up on a fresh machine, build every CUDA module for sm_90a ahead of time and the default
# set for sm_100a too (a compile error on either fails here), then run the test suite. GPU
# tests are skipped where no GPU is visible.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck disable=SC1091
. scripts/setup_env.sh
start=$(date +%s)
echo "== AOT build of every module for sm_90a (python -m fusedcomm.jit.aot)"
python -m fusedcomm.jit.aot --arch 9.0a --configs all --out "$root/.aot"
echo "== AOT build of the default modules for sm_100a (compile check: SM100 code paths)"
python -m fusedcomm.jit.aot --arch 10.0a --configs default --out "$root/.aot-sm100"
export FUSEDCOMM_AOT_DIR="$root/.aot" FUSEDCOMM_CUDA_ARCH_LIST=9.0a
echo "== fresh venv: prebuilt-kernel wheel, no compiler on warmup, CLI, errors, logging"
bash scripts/check_fresh_venv.sh "$root/.aot"
echo "== style budgets"
python scripts/check_budgets.py
echo "== lint (ruff, clang-format)"
scripts/lint.sh
echo "== tests"
python -m pytest -q "$@" tests
echo "test.sh: done in $(( $(date +%s) - start )) s"
