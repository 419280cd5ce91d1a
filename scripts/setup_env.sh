#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/demo.sh: make .venv (once) and activate it.
# On a GPU host whose python already has a CUDA torch, the venv sees the system packages and
# keeps that torch; elsewhere it installs torch==2.13.0 (CPU build).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  python3 -m venv --system-site-packages "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip_install() { python -m pip install -q --disable-pip-version-check "$@"; }
if ! python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU build)" >&2
  pip_install torch==2.13.0
fi
missing=$(python - <<'PY'
import importlib.util
need = {"tvm_ffi": "apache-tvm-ffi==0.1.15.post2", "ninja": "ninja", "filelock": "filelock",
        "pytest": "pytest", "mpi4py": "mpich mpi4py",
        # style checkers for scripts/lint.sh, pinned: their output changes between versions
        "ruff": "ruff==0.17.5", "clang_format": "clang-format==23.1.3"}
print(" ".join(v for k, v in need.items() if importlib.util.find_spec(k) is None))
PY
)
if [ -n "$missing" ]; then
  echo "setup: installing $missing" >&2
  # shellcheck disable=SC2086
  pip_install $missing
fi
if ! python -c "import fusedcomm, sys; sys.exit(0 if fusedcomm.__file__.startswith('$root') else 1)" 2>/dev/null; then
  pip_install --no-deps --no-build-isolation -e "$root" >/dev/null 2>&1 || true
fi
export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
