"""Reference for the decode context-parallel all-to-all: plain torch, any device.

The whole CP group at once: ``partial_o[p]`` and ``softmax_stats[p]`` are rank ``p``'s inputs
(``W`` = the lists' length = cp_size). Rank ``r`` receives, for every rank ``p`` (``r``
included), the slice rank ``p`` holds for ``r``::

    out_o[r][..., p, :] = partial_o[p][..., r, :]
    out_s[r][..., p, :] = softmax_stats[p][..., r, :]

a transpose of the second-to-last axis across ranks. No arithmetic: every byte is copied, so a
kernel's result compares with ``torch.equal`` (NaN payloads included, through a bit view).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["dcp_alltoall_reference"]


def _transpose(xs: Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    world = len(xs)
    for p, x in enumerate(xs):
        if x.dim() < 2 or x.size(-2) != world:
            raise ValueError(
                f"dcp_alltoall_reference: {name}[{p}] ({tuple(x.shape)}) must be [..., {world}, *]"
            )
        if x.shape != xs[0].shape or x.dtype != xs[0].dtype:
            raise ValueError(f"dcp_alltoall_reference: every {name} must have one shape and dtype")
    return [torch.stack([x[..., r, :] for x in xs], dim=-2) for r in range(world)]


def dcp_alltoall_reference(
    partial_o: Sequence[torch.Tensor], softmax_stats: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's ``(partial_o_out, softmax_stats_out)``: two lists indexed by rank, each
    tensor with its input's shape and dtype."""
    if len(partial_o) != len(softmax_stats) or not partial_o:
        raise ValueError("dcp_alltoall_reference: one partial_o and one softmax_stats per rank")
    return _transpose(partial_o, "partial_o"), _transpose(softmax_stats, "softmax_stats")
