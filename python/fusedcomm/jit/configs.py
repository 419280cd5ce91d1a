"""Configuration fields every kernel family keys its modules on: dtype and world size."""

from __future__ import annotations

import torch

# dtype key -> (C++ type, torch dtype)
DTYPES = {
    "f32": ("float", torch.float32),
    "f16": ("__half", torch.float16),
    "bf16": ("__nv_bfloat16", torch.bfloat16),
}
# Specialised world sizes; 0 = any world size up to 8, read at run time.
WORLDS = (2, 4, 8, 0)

_TORCH_TO_KEY = {t: k for k, (_, t) in DTYPES.items()}


def dtype_key(dtype: torch.dtype, op: str) -> str:
    """'bf16' for torch.bfloat16, and so on; TypeError naming ``op`` for dtypes without kernels."""
    try:
        return _TORCH_TO_KEY[dtype]
    except KeyError:
        raise TypeError(
            f"{op}: dtype {dtype} is not supported (float32, float16, bfloat16)"
        ) from None


def world_key(world: int) -> int:
    """The specialisation a world size runs on: itself for 2, 4, 8, else 0 (generic)."""
    return world if world in (2, 4, 8) else 0


def check_key(family: str, dtype: str, world: int) -> None:
    """ValueError unless (dtype, world) names a configuration of DTYPES x WORLDS."""
    if dtype not in DTYPES:
        raise ValueError(f"{family}: dtype key {dtype!r} must be one of {sorted(DTYPES)}")
    if world not in WORLDS:
        raise ValueError(f"{family}: world key {world} must be one of {WORLDS}")
