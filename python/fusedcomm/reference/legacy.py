"""Reference of the legacy ``trtllm_custom_all_reduce``: plain torch, any device.

The sum is the fusion kernels' (``fusion_all_reduce`` with fp32 accumulation: fp32 in rank
order, one rounding, ``-0.0`` sent as ``+0.0``); the epilogues follow §7, with every stored
value rounded to the activation dtype ``T``. The NCCL strategy and the pre+post norm run
:func:`legacy_epilogue` itself on the device, after their all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..enums import AllReduceFusionOp
from .fusion import fusion_all_reduce, residual_rms_norm

__all__ = ["custom_all_reduce_reference", "fold_bias", "legacy_epilogue"]

_OPS = (
    AllReduceFusionOp.NONE,
    AllReduceFusionOp.RESIDUAL_RMS_NORM,
    AllReduceFusionOp.RESIDUAL_RMS_PREPOST_NORM,
)


def fold_bias(residual: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``rd_T(float(residual) + float(bias))`` per row (``residual``: ``[N, D]``, ``bias``:
    ``[D]`` or None, then ``residual`` itself): the residual the fused RMSNorm adds."""
    if bias is None:
        return residual
    return (residual.float() + bias.reshape(1, -1).float()).to(residual.dtype)


def _ones(like: torch.Tensor, hidden: int) -> torch.Tensor:
    return torch.ones(hidden, dtype=like.dtype, device=like.device)


def legacy_epilogue(
    reduced: torch.Tensor,
    fusion_op: int,
    *,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    weight_pre_residual_norm: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out, intermediate)`` of one call from its all-reduced rows ``reduced`` (``[N, D]``
    of ``T``); ``intermediate`` is None for NONE.

    Unfused equivalent (``RMSNorm(v, w)``: ``residual_rms_norm``'s norm with
    ``rstd = rsqrt(mean(float(v)^2) + eps)``, ``w`` = ones when None)::

        NONE:                      out = reduced
        RESIDUAL_RMS_NORM:         r = rd_T(residual + bias)                (bias None: residual)
                                   intermediate = rd_T(reduced + r)
                                   out = RMSNorm(intermediate, weight)
        RESIDUAL_RMS_PREPOST_NORM: v = rd_T(reduced + bias)                 (bias None: reduced)
                                   pre = RMSNorm(v, weight_pre_residual_norm)
                                   intermediate = rd_T(pre + residual)
                                   out = RMSNorm(intermediate, weight)
    """
    op = "legacy_epilogue"
    if fusion_op not in _OPS:
        raise ValueError(
            f"{op}: fusion_op ({fusion_op}) must be NONE, RESIDUAL_RMS_NORM or "
            "RESIDUAL_RMS_PREPOST_NORM"
        )
    if fusion_op == AllReduceFusionOp.NONE:
        return reduced, None
    if residual is None:
        raise ValueError(f"{op}: fusion_op {fusion_op} needs residual")
    hidden = reduced.shape[-1]
    residual = residual.reshape(reduced.shape)
    weight = _ones(reduced, hidden) if weight is None else weight
    if fusion_op == AllReduceFusionOp.RESIDUAL_RMS_NORM:
        return tuple(reversed(residual_rms_norm(reduced, fold_bias(residual, bias), weight, eps)))
    w_pre = _ones(reduced, hidden) if weight_pre_residual_norm is None else weight_pre_residual_norm
    zero = torch.zeros_like(reduced)
    _, pre = residual_rms_norm(reduced, fold_bias(zero, bias), w_pre, eps)
    intermediate, out = residual_rms_norm(pre, residual, weight, eps)
    return out, intermediate


def custom_all_reduce_reference(
    inputs: Sequence[torch.Tensor],
    token_num: int,
    fusion_op: int = AllReduceFusionOp.NONE,
    **epilogue,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out, intermediate)`` of ``trtllm_custom_all_reduce`` from every rank's ``inp``
    (``inputs[q]``: rank q's, ``token_num * D`` elements of one dtype), shaped
    ``[token_num, D]``; ``epilogue``: the keyword arguments of :func:`legacy_epilogue`.
    Every rank gets the same bits."""
    rows = [t.reshape(token_num, -1) for t in inputs]
    return legacy_epilogue(fusion_all_reduce(rows, fp32_acc=True), fusion_op, **epilogue)
