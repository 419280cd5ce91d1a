#!/usr/bin/env bash
# Set up if needed, show what this machine offers, and time our collectives where 2+ GPUs are
# visible. With one GPU, run a checked two-rank round with the ranks sharing it (no timings).
# Without a GPU, build the kernels for sm_90a ahead of time and load them instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck disable=SC1091
. scripts/setup_env.sh
python -m fusedcomm doctor
gpus=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$gpus" -ge 2 ]; then
  python -m fusedcomm bench "$@"
  exit
fi
if [ "$gpus" -eq 1 ]; then
  echo
  echo "demo: 1 CUDA GPU visible: 'fusedcomm bench' needs a GPU per rank, so nothing is timed."
  echo "demo: showing instead the main job with two ranks sharing the GPU (their kernels take"
  echo "demo: turns, so timings would mean nothing; results are checked against the references)."
  python -m fusedcomm.testing.shared_demo --world 2
  exit
fi
echo
echo "demo: $gpus CUDA GPU(s) visible, so 'fusedcomm bench' (2 or more GPUs) cannot run here."
echo "demo: showing instead what works without a GPU: every module built for sm_90a ahead of"
echo "demo: time (into .aot, reused by scripts/test.sh) and loaded through TVM-FFI."
python -m fusedcomm.jit.aot --arch 9.0a --out "$root/.aot"
FUSEDCOMM_AOT_DIR="$root/.aot" FUSEDCOMM_CUDA_ARCH_LIST=9.0a FUSEDCOMM_NO_JIT=1 python -c '
import fusedcomm
names = fusedcomm.warmup()
print("demo: loaded", len(names), "module(s) for sm_90a without a compiler:", *names)'
