"""References for the MoE all-reduce fusions (patterns 6 and 7): plain torch, any device.

Each rank first combines its experts' outputs into one ``[N, D]`` row block (the prologue),
in the activation dtype ``T`` with a rounding after every step (``rd_T`` = round to nearest
even in ``T``; every product and sum is an fp32 operation on the ``T`` values):

- :func:`moe_reduction` (pattern 6): scaled sum of the active experts' outputs plus a token
  input;
- :func:`moe_finalize` (pattern 7): gather of the permuted expert outputs through an index
  table, optional per-(token, k) weights, routed scaling and a shared expert's output.

:func:`moe_allreduce_fusion_reference` then all-reduces the prologue results of every rank
(:func:`~fusedcomm.reference.fusion.fusion_all_reduce`, fp32 in rank order) and applies the
residual add, RMSNorm and optional NVFP4 of the fused patterns. Prologue, all-reduce and
residual add are exact (compare with ``torch.equal``); the norm and what is derived from it
carry the tolerance described in :mod:`fusedcomm.reference.fusion`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..enums import AllReduceFusionPattern, QuantizationSFLayout
from .fusion import fusion_all_reduce, residual_rms_norm
from .quant import quantize_nvfp4, write_scale_factors

__all__ = ["moe_allreduce_fusion_reference", "moe_finalize", "moe_reduction"]

_ACTIVATIONS = (torch.float16, torch.bfloat16)
_P = AllReduceFusionPattern


def _activation(op: str, name: str, t, dtype: torch.dtype | None = None) -> torch.dtype:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _ACTIVATIONS:
        raise TypeError(f"{op}: {name}.dtype ({t.dtype}) must be float16 or bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name}.dtype ({t.dtype}) must be the activations' ({dtype})")
    return t.dtype


def _shape(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")


def _rd(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype)


def moe_reduction(
    active_experts_token_input: torch.Tensor,
    scale_input: torch.Tensor,
    token_input: torch.Tensor,
) -> torch.Tensor:
    """Pattern 6's prologue: one rank's scaled sum of its experts' outputs plus a token input.

    Unfused equivalent, per token ``t`` (``acc`` is a ``T`` value, +0.0 at the start)::

        acc = 0
        for e in 0 .. E-1:
            acc = rd_T(float(acc) + float(rd_T(float(x[e, t]) * scale[e, t])))
        acc = rd_T(float(acc) + float(token_input[t]))

    ``active_experts_token_input`` (``x``): ``[E, N, D]`` float16 or bfloat16, expert-major;
    ``scale_input``: ``[E, N]`` float32; ``token_input``: ``[N, D]`` of ``x``'s dtype.
    Returns a new ``[N, D]`` tensor of that dtype.
    """
    op = "moe_reduction"
    dtype = _activation(op, "active_experts_token_input", active_experts_token_input)
    _activation(op, "token_input", token_input, dtype)
    if active_experts_token_input.dim() != 3:
        raise ValueError(
            f"{op}: active_experts_token_input must be [E, N, D], got "
            f"{tuple(active_experts_token_input.shape)}"
        )
    e, n, d = active_experts_token_input.shape
    _shape(op, "token_input", token_input, (n, d))
    if not isinstance(scale_input, torch.Tensor) or scale_input.dtype != torch.float32:
        raise TypeError(f"{op}: scale_input must be a float32 tensor")
    _shape(op, "scale_input", scale_input, (e, n))
    x = active_experts_token_input.float()
    s = scale_input.unsqueeze(-1)
    acc = torch.zeros((n, d), dtype=dtype, device=token_input.device)
    for k in range(e):
        acc = _rd(acc.float() + _rd(x[k] * s[k], dtype).float(), dtype)
    return _rd(acc.float() + token_input.float(), dtype)


def moe_finalize(
    allreduce_in: torch.Tensor,
    expanded_idx_to_permuted_idx: torch.Tensor,
    expert_scale_factor: torch.Tensor | None = None,
    routed_scaling_factor: float | None = None,
    shared_expert_output: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pattern 7's prologue: gather each token's expert outputs from the permuted rows.

    Unfused equivalent, per token ``t`` (``acc`` is a ``T`` value, +0.0 at the start;
    ``rsf = fp32(routed_scaling_factor)``)::

        acc = 0
        for k in 0 .. top_k-1:
            p = idx[t, k]
            if p == -1: continue                                     # not routed
            if expert_scale_factor is given:
                acc = rd_T(float(acc) + float(rd_T(float(allreduce_in[p]) * float(w[t, k]))))
            else:
                acc = rd_T(float(acc) + float(allreduce_in[p]))
        if routed_scaling_factor is not None and rsf != 1:
            acc = rd_T(float(acc) * rsf)
        if shared_expert_output is given:
            acc = rd_T(float(acc) + float(shared_expert_output[t]))

    ``allreduce_in``: ``[P, D]`` (or any ``[..., D]``, read as ``P`` rows) float16 or
    bfloat16; ``expanded_idx_to_permuted_idx`` (``idx``): ``[N, top_k]`` int32, each entry a
    row of ``allreduce_in`` or -1; ``expert_scale_factor`` (``w``): ``[N, top_k]`` of the
    activation dtype; ``shared_expert_output``: ``[N, D]`` of that dtype. Returns a new
    ``[N, D]`` tensor of the activation dtype.
    """
    op = "moe_finalize"
    dtype = _activation(op, "allreduce_in", allreduce_in)
    idx = expanded_idx_to_permuted_idx
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int32:
        raise TypeError(f"{op}: expanded_idx_to_permuted_idx must be an int32 tensor")
    if idx.dim() != 2:
        raise ValueError(
            f"{op}: expanded_idx_to_permuted_idx must be [N, top_k], got {tuple(idx.shape)}"
        )
    n, top_k = idx.shape
    d = allreduce_in.shape[-1]
    rows = allreduce_in.reshape(-1, d)
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= rows.shape[0]):
        raise ValueError(
            f"{op}: expanded_idx_to_permuted_idx entries must be -1 or a row of "
            f"allreduce_in (0..{rows.shape[0] - 1}), got {int(idx.min())}..{int(idx.max())}"
        )
    if expert_scale_factor is not None:
        _activation(op, "expert_scale_factor", expert_scale_factor, dtype)
        _shape(op, "expert_scale_factor", expert_scale_factor, (n, top_k))
    if shared_expert_output is not None:
        _activation(op, "shared_expert_output", shared_expert_output, dtype)
        _shape(op, "shared_expert_output", shared_expert_output, (n, d))
    acc = torch.zeros((n, d), dtype=dtype, device=allreduce_in.device)
    for k in range(top_k):
        p = idx[:, k].to(torch.int64)
        routed = (p >= 0).unsqueeze(1)
        term = rows[p.clamp(min=0)].float()
        if expert_scale_factor is not None:
            term = _rd(term * expert_scale_factor[:, k : k + 1].float(), dtype).float()
        acc = torch.where(routed, _rd(acc.float() + term, dtype), acc)
    if routed_scaling_factor is not None:
        rsf = torch.tensor(float(routed_scaling_factor), dtype=torch.float32)
        if rsf.item() != 1.0:
            acc = _rd(acc.float() * rsf.to(acc.device), dtype)
    if shared_expert_output is not None:
        acc = _rd(acc.float() + shared_expert_output.float(), dtype)
    return acc


def _per_rank(op: str, name: str, value, ranks: int) -> list:
    """``value`` as one entry per rank: a sequence of ``ranks`` entries, or None for all."""
    if value is None:
        return [None] * ranks
    if isinstance(value, torch.Tensor) or len(value) != ranks:
        raise ValueError(f"{op}: {name} must be a sequence with one entry per rank ({ranks})")
    return list(value)


def moe_allreduce_fusion_reference(
    pattern: int,
    residual_in: torch.Tensor,
    rms_gamma: torch.Tensor,
    *,
    rms_eps: float = 1e-6,
    weight_bias: float = 0.0,
    active_experts_token_input: Sequence[torch.Tensor] | None = None,
    scale_input: Sequence[torch.Tensor] | None = None,
    token_input: Sequence[torch.Tensor] | None = None,
    allreduce_in: Sequence[torch.Tensor] | None = None,
    expanded_idx_to_permuted_idx: Sequence[torch.Tensor] | None = None,
    expert_scale_factor: Sequence[torch.Tensor | None] | None = None,
    routed_scaling_factor: float | None = None,
    shared_expert_output: Sequence[torch.Tensor | None] | None = None,
    quantize: bool = False,
    scale_factor: float = 1.0,
    layout_code: int = QuantizationSFLayout.SWIZZLED_128x4,
    sf_poison: int = 0,
) -> dict[str, torch.Tensor]:
    """Every output of the MoE fusions (pattern 6: reduction, pattern 7: finalize).

    Unfused equivalent (``q`` ranges over the ranks; the per-rank arguments are sequences
    with one entry per rank, and their length is the world size)::

        a_q = moe_reduction(active_experts_token_input[q], scale_input[q], token_input[q])  # 6
        a_q = moe_finalize(allreduce_in[q], expanded_idx_to_permuted_idx[q],
                           expert_scale_factor[q], routed_scaling_factor,
                           shared_expert_output[q])                                          # 7
        s = fusion_all_reduce([a_0, ..., a_{W-1}])       # fp32 in rank order, one rd_T
        moe_allreduce_out = s                              # pattern 6 only
        residual_out, norm_out = residual_rms_norm(s, residual_in, rms_gamma, rms_eps,
                                                   weight_bias)
        if quantize:                                       # NVFP4 of norm_out
            quant_out, sf = quantize_nvfp4(norm_out, scale_factor)
            scale_out = write_scale_factors(sf, layout_code, poison=sf_poison)

    ``residual_in``: ``[N, D]`` of the activation dtype (the same on every rank);
    ``rms_gamma``: ``[D]``; ``expert_scale_factor`` and ``shared_expert_output`` may be None
    (for every rank) or hold None entries. ``quant_out`` is ``uint8 [N, D/2]``, ``scale_out``
    the ``uint8`` scale-factor buffer of ``layout_code`` with padding bytes ``sf_poison``.
    Returns a dict of the outputs the pattern writes: ``moe_allreduce_out`` (6),
    ``residual_out``, ``norm_out`` and, when ``quantize``, ``quant_out`` and ``scale_out``.
    """
    op = "moe_allreduce_fusion_reference"
    if pattern == _P.kMoEReductionARResidualRMSNorm:
        if active_experts_token_input is None or scale_input is None or token_input is None:
            raise ValueError(
                f"{op}: pattern 6 needs active_experts_token_input, scale_input and token_input"
            )
        ranks = len(active_experts_token_input)
        scales = _per_rank(op, "scale_input", scale_input, ranks)
        tokens = _per_rank(op, "token_input", token_input, ranks)
        parts = [
            moe_reduction(x, s, t) for x, s, t in zip(active_experts_token_input, scales, tokens)
        ]
    elif pattern == _P.kMoEFinalizeARResidualRMSNorm:
        if allreduce_in is None or expanded_idx_to_permuted_idx is None:
            raise ValueError(f"{op}: pattern 7 needs allreduce_in and expanded_idx_to_permuted_idx")
        ranks = len(allreduce_in)
        idx = _per_rank(op, "expanded_idx_to_permuted_idx", expanded_idx_to_permuted_idx, ranks)
        weights = _per_rank(op, "expert_scale_factor", expert_scale_factor, ranks)
        shared = _per_rank(op, "shared_expert_output", shared_expert_output, ranks)
        parts = [
            moe_finalize(x, i, w, routed_scaling_factor, s)
            for x, i, w, s in zip(allreduce_in, idx, weights, shared)
        ]
    else:
        raise ValueError(f"{op}: pattern ({pattern}) must be 6 or 7 (the MoE fusions)")
    s = fusion_all_reduce(parts)
    residual_out, norm_out = residual_rms_norm(s, residual_in, rms_gamma, rms_eps, weight_bias)
    out = {"residual_out": residual_out, "norm_out": norm_out}
    if pattern == _P.kMoEReductionARResidualRMSNorm:
        out = {"moe_allreduce_out": s, **out}
    if quantize:
        out["quant_out"], sf = quantize_nvfp4(norm_out, scale_factor)
        out["scale_out"] = write_scale_factors(sf, layout_code, poison=sf_poison)
    return out
