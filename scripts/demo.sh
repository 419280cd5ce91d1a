#!/usr/bin/env bash
# Set up if needed, then show what this machine offers and time what can run here.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck disable=SC1091
. scripts/setup_env.sh
python -m fusedcomm doctor
python -m fusedcomm bench "$@"
