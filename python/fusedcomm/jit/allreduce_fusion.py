"""JIT specs of the Lamport all-reduce family (``allreduce_fusion`` and friends).

One host-only control module (workspace sizes, control blocks, the planner, the launch entry)
and one kernel module per (dtype, world size) holding every pattern, both algorithms and every
row width: ``kernel_spec(dtype, world)``. A kernel module is ``KERNEL_PARTS`` compile units
(the patterns of ``kFusionPartPatterns`` row k in csrc/allreduce_fusion.h, built in parallel)
and a launcher unit. The first call of a configuration builds just that module, and the
control module calls its launcher.
"""

from __future__ import annotations

import functools

from .configs import DTYPES, WORLDS, check_key
from .spec import JitSpec, Unit

# Compile units of kernels per module: the rows of kFusionPartPatterns (the control module's
# describe() reports the same number; a test holds the two together).
KERNEL_PARTS = 5

# What engines use: built ahead of time by default.
DEFAULT_CONFIGS = tuple(("bf16", w) for w in (2, 4, 8))


@functools.cache
def control_spec() -> JitSpec:
    return JitSpec(
        name="allreduce_fusion",
        units=(Unit("allreduce_fusion.cu"), Unit("allreduce_fusion_moe.cu")),
        host_only=True,
    )


@functools.cache
def kernel_spec(dtype: str, world: int) -> JitSpec:
    """The kernels of one configuration: ``dtype`` a key of DTYPES, ``world`` one of WORLDS."""
    check_key("allreduce_fusion", dtype, world)
    key = (f"FC_DTYPE={DTYPES[dtype][0]}", f"FC_WORLD={world}")
    parts = tuple(
        Unit("allreduce_fusion_kernels.cu", (*key, f"FC_PART={k}")) for k in range(KERNEL_PARTS)
    )
    return JitSpec(
        name=f"allreduce_fusion_{dtype}_w{world if world else 'any'}",
        units=(*parts, Unit("allreduce_fusion_launcher.cu", key)),
        key=(("dtype", dtype), ("world", str(world))),
    )


def all_specs() -> list[JitSpec]:
    return [control_spec(), *(kernel_spec(d, w) for d in DTYPES for w in WORLDS)]


def default_specs() -> list[JitSpec]:
    return [control_spec(), *(kernel_spec(d, w) for d, w in DEFAULT_CONFIGS)]
