"""Plain-torch references for fusedcomm's collectives, shared by the tests and by users.

Each reference computes on whatever device its inputs live on (CPU included), takes every
rank's tensor explicitly (no process group needed) and fixes the order of every floating-point
operation, so a kernel that promises the same order can be compared with ``torch.equal``.

- :func:`all_reduce`: fp32 sum in ascending rank order, one final rounding.
"""

from .allreduce import all_reduce

__all__ = ["all_reduce"]
