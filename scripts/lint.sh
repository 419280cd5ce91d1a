#!/usr/bin/env bash
# Style checks, run by scripts/test.sh: ruff (lint rules and formatting, configured in
# pyproject.toml) for Python, clang-format (.clang-format) for csrc/*.cu, csrc/*.h and
# include/**/*.cuh. Installs nothing: scripts/setup_env.sh provides ruff and clang-format.
# Exits non-zero when any check has a finding; every check runs, so one report shows them all.
#   usage: scripts/lint.sh          check only
#          scripts/lint.sh --fix    apply fixes and formatting (Python and C++/CUDA), then check
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
fix=0
case "${1:-}" in
  "") ;;
  --fix) fix=1 ;;
  *) echo "usage: scripts/lint.sh [--fix]" >&2; exit 2 ;;
esac
for tool in ruff clang-format; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "lint: $tool not found; run scripts/setup_env.sh (or pip install ruff clang-format)" >&2
    exit 2
  fi
done
# C++/CUDA sources known to git (tracked, or new and not ignored).
mapfile -t cxx < <(git ls-files -co --exclude-standard -- 'csrc/*.cu' 'csrc/*.h' 'include/**/*.cuh')
if [ "$fix" = 1 ]; then
  ruff check --fix --quiet . || true
  ruff format --quiet .
  [ "${#cxx[@]}" -eq 0 ] || clang-format -i "${cxx[@]}"
fi
status=0
echo "lint: ruff check"
ruff check . || status=1
echo "lint: ruff format --check"
ruff format --check . || status=1
echo "lint: clang-format (${#cxx[@]} files)"
if [ "${#cxx[@]}" -gt 0 ]; then
  clang-format --dry-run --Werror "${cxx[@]}" || status=1
fi
if [ "$status" -ne 0 ]; then
  echo "lint: findings above; scripts/lint.sh --fix applies the automatic fixes" >&2
fi
exit "$status"
