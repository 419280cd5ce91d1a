"""Fail when a file outgrows its size budget (see the house style): split it instead."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = [  # (glob, max lines)
    ("include/**/*.cuh", 600),
    ("csrc/*.cu", 300),
    ("python/fusedcomm/**/*.py", 800),
    ("tests/*.py", 600),
]


def main() -> int:
    bad = []
    for pattern, limit in BUDGETS:
        for path in ROOT.glob(pattern):
            n = len(path.read_text().splitlines())
            if n > limit:
                bad.append(f"{path.relative_to(ROOT)}: {n} lines > {limit}")
    for line in bad:
        print(f"over budget: {line}")
    print(f"budgets: {'ok' if not bad else f'{len(bad)} file(s) over'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
