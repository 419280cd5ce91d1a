"""Reference for mixed communication (§12): plain torch, any device, every rank at once.

``xs[w]`` is world rank ``w``'s ``x_in``; ``tp_dp_of(w)`` gives its (TP index, DP index) (for
one node: ``w = t + d * tp``, :meth:`fusedcomm.runtime.mixed_comm_workspace.MixedTopology.of`
in general). Sums are fp32 in ascending world-rank order (the first upcast, then ``+=``),
rounded once::

    ALLREDUCE                out = sum over t' of x^(t')
    ALLGATHER                out = cat over d' of x^(d')
    REDUCESCATTER            out = sum over d' of x^(d')[d M:(d+1) M]
    ALLREDUCE_ALLGATHER      out[d' N:(d'+1) N] = sum over t' of x^(t',d')
    REDUCESCATTER_ALLREDUCE  out = sum over every rank of its x[d M:(d+1) M]

The fused kernels of one node sum in this order too; NCCL's reductions have their own order
(compare those at a tolerance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["mixed_comm_reference"]

_SCATTER = ("REDUCESCATTER", "REDUCESCATTER_ALLREDUCE")


def _sum(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    acc = parts[0].to(torch.float32, copy=True)
    for p in parts[1:]:
        acc += p.float()
    return acc


def mixed_comm_reference(
    op: object, xs: Sequence[torch.Tensor], tp_dp_of: Callable[[int], tuple[int, int]]
) -> list[torch.Tensor]:
    """Every world rank's output for ``op`` (a MixedCommOp or its name), indexed by rank."""
    name = getattr(op, "name", op)
    world = len(xs)
    if not world or any(x.shape != xs[0].shape or x.dtype != xs[0].dtype for x in xs):
        raise ValueError("mixed_comm_reference: one x_in per rank, all of one shape and dtype")
    where = [tp_dp_of(w) for w in range(world)]
    dp = 1 + max(d for _, d in where)
    dtype = xs[0].dtype
    if name in ("ALLREDUCE", "ALLGATHER", "ALLREDUCE_ALLGATHER"):
        blocks = [_sum([xs[w] for w in range(world) if where[w][1] == d]).to(dtype)
                  for d in range(dp)]  # fmt: skip
        if name == "ALLREDUCE":
            return [blocks[0] for _ in range(world)]
        out = torch.cat(blocks)
        return [out for _ in range(world)]
    if name not in _SCATTER:
        raise ValueError(f"mixed_comm_reference: unknown op {op!r}")
    if xs[0].shape[0] % dp:
        raise ValueError(f"mixed_comm_reference: x_in.shape[0] must be divisible by dp ({dp})")
    outs = []
    for w in range(world):
        d = where[w][1]
        senders = range(world)
        if name == "REDUCESCATTER":  # tp 1: every rank is a DP rank
            senders = [v for v in range(world) if where[v][0] == where[w][0]]
        outs.append(_sum([xs[v].chunk(dp)[d] for v in senders]).to(dtype))
    return outs
