"""Plain-torch references for fusedcomm's collectives, shared by the tests and by users.

Each reference computes on whatever device its inputs live on (CPU included), takes every
rank's tensor explicitly (no process group needed) and fixes the order of every floating-point
operation, so a kernel that promises the same order can be compared with ``torch.equal``.

- :func:`all_reduce`: fp32 sum in ascending rank order, one final rounding.
"""

from .allreduce import all_reduce
from .fusion import (
    allreduce_fusion_reference,
    fp8_e4m3,
    fusion_all_reduce,
    quantize_fp8_dynamic,
    quantize_fp8_static,
    residual_rms_norm,
)

__all__ = [
    "all_reduce",
    "allreduce_fusion_reference",
    "fp8_e4m3",
    "fusion_all_reduce",
    "quantize_fp8_dynamic",
    "quantize_fp8_static",
    "residual_rms_norm",
]
