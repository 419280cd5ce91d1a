"""The workspace every fused-all-reduce benchmark rank creates."""

from __future__ import annotations

import torch

from ..runtime.comm_backend import TorchDistBackend
from ..runtime.fusion_workspace import create_allreduce_fusion_workspace


def lamport_workspace(
    rank: int, world: int, max_tokens: int, hidden: int, dtype: torch.dtype, backend="trtllm"
):
    """A fusion workspace over the default process group: "trtllm" (CUDA IPC buffers) or
    "mnnvl" (the same kernels over peer-mapped rows)."""
    return create_allreduce_fusion_workspace(
        backend=backend,
        world_size=world,
        rank=rank,
        max_token_num=max_tokens,
        hidden_dim=hidden,
        dtype=dtype,
        comm_backend=TorchDistBackend(),
    )
