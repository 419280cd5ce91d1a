"""JIT specs of the Lamport all-reduce family (``allreduce_fusion`` and friends).

One host-only control module (workspace sizes, control blocks, the planner, the launch entry)
and one kernel module per (dtype, world size) holding every pattern (0, 1, 2, 4, 10, 11), both
algorithms and every row width: ``kernel_spec(dtype, world)``. The first call of a
configuration builds just that module, and the control module calls its launcher.
"""

from __future__ import annotations

import functools

import torch

from .spec import JitSpec, Unit

# dtype key -> (C++ type, torch dtype)
DTYPES = {
    "f32": ("float", torch.float32),
    "f16": ("__half", torch.float16),
    "bf16": ("__nv_bfloat16", torch.bfloat16),
}
# Specialised world sizes; 0 = any world size up to 8, read at run time.
WORLDS = (2, 4, 8, 0)
# What engines use: built ahead of time by default.
DEFAULT_CONFIGS = tuple(("bf16", w) for w in (2, 4, 8))

_TORCH_TO_KEY = {t: k for k, (_, t) in DTYPES.items()}


def dtype_key(dtype: torch.dtype) -> str:
    """'bf16' for torch.bfloat16, and so on; TypeError for dtypes without kernels."""
    try:
        return _TORCH_TO_KEY[dtype]
    except KeyError:
        raise TypeError(
            f"allreduce_fusion: dtype {dtype} is not supported (float32, float16, bfloat16)"
        ) from None


def world_key(world: int) -> int:
    """The specialisation a world size runs on: itself for 2, 4, 8, else 0 (generic)."""
    return world if world in (2, 4, 8) else 0


@functools.cache
def control_spec() -> JitSpec:
    return JitSpec(name="allreduce_fusion", units=(Unit("allreduce_fusion.cu"),), host_only=True)


@functools.cache
def kernel_spec(dtype: str, world: int) -> JitSpec:
    """The kernels of one configuration: ``dtype`` a key of DTYPES, ``world`` one of WORLDS."""
    if dtype not in DTYPES:
        raise ValueError(f"allreduce_fusion: dtype key {dtype!r} must be one of {sorted(DTYPES)}")
    if world not in WORLDS:
        raise ValueError(f"allreduce_fusion: world key {world} must be one of {WORLDS}")
    return JitSpec(
        name=f"allreduce_fusion_{dtype}_w{world if world else 'any'}",
        units=(
            Unit(
                "allreduce_fusion_kernels.cu", (f"FC_DTYPE={DTYPES[dtype][0]}", f"FC_WORLD={world}")
            ),
        ),
        key=(("dtype", dtype), ("world", str(world))),
    )


def all_specs() -> list[JitSpec]:
    return [control_spec(), *(kernel_spec(d, w) for d in DTYPES for w in WORLDS)]


def default_specs() -> list[JitSpec]:
    return [control_spec(), *(kernel_spec(d, w) for d, w in DEFAULT_CONFIGS)]
