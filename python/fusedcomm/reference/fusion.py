"""References for the fused all-reduce patterns: plain torch, any device (CPU included).

Every function fixes the order and precision of each floating-point step, following the
kernels' contract: values are rounded to the activation dtype ``T`` wherever a kernel stores
one, statistics are fp32. Where the kernels promise the same order (sums, residual add, FP8
of a given value) results can be compared with ``torch.equal``; the RMSNorm statistic is a
sum whose order is not fixed and ``rsqrt`` is approximate on the GPU, so normalised values
and what is derived from them need a tolerance of about one unit in the last place of ``T``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..enums import DYNAMIC_FP8_MIN_SCALE, FP8_E4M3_MAX, AllReduceFusionPattern, pattern_name

__all__ = [
    "allreduce_fusion_reference",
    "fp8_e4m3",
    "fusion_all_reduce",
    "quantize_fp8_dynamic",
    "quantize_fp8_static",
    "residual_rms_norm",
]

_ACTIVATIONS = (torch.float16, torch.bfloat16, torch.float32)
_P = AllReduceFusionPattern
# pattern -> (writes norm_out, quantiser: None / "static" / "dynamic")
_PATTERNS = {
    _P.kARResidualRMSNorm: (True, None),
    _P.kARResidualRMSNormFP8Quant: (False, "static"),
    _P.kARResidualRMSNormOutFP8Quant: (True, "static"),
    _P.kARResidualRMSNormDynamicFP8Quant: (False, "dynamic"),
    _P.kARResidualRMSNormOutDynamicFP8Quant: (True, "dynamic"),
}


def _check_activation(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _ACTIVATIONS:
        raise TypeError(f"{op}: {name}.dtype ({t.dtype}) must be float16, bfloat16 or float32")


def fusion_all_reduce(inputs: Sequence[torch.Tensor], *, fp32_acc: bool = True) -> torch.Tensor:
    """Sum of every rank's tensor as the Lamport fusion kernels compute it.

    Unfused equivalent::

        x_q = where(x_q is -0.0, +0.0, x_q)           # senders never send the Lamport sentinel
        if fp32_acc or T is float32:
            s = rd_T(((float(x_0) + float(x_1)) + ...) + float(x_{W-1}))   # one rounding
        else:
            s = x_0; for q in 1..W-1: s = rd_T(float(s) + float(x_q))      # pairwise in T

    ``inputs[q]`` is rank q's tensor (one shape, one dtype among float16/bfloat16/float32).
    Returns a new contiguous tensor of that shape and dtype; every rank holds the same bits.
    """
    op = "fusion_all_reduce"
    if isinstance(inputs, torch.Tensor) or len(inputs) == 0:
        raise ValueError(f"{op}: inputs must be a non-empty sequence with one tensor per rank")
    first = inputs[0]
    for q, t in enumerate(inputs):
        _check_activation(op, f"inputs[{q}]", t)
        if t.dtype != first.dtype or t.shape != first.shape:
            raise ValueError(
                f"{op}: inputs[{q}] ({t.dtype}, {tuple(t.shape)}) differs from "
                f"inputs[0] ({first.dtype}, {tuple(first.shape)})"
            )
    # Adding +0.0 turns -0.0 into +0.0 and leaves every other value (NaN included) alone.
    sanitised = [t + 0.0 for t in inputs]
    if fp32_acc or first.dtype == torch.float32:
        acc = sanitised[0].float()
        for t in sanitised[1:]:
            acc = acc + t.float()
        return acc.to(first.dtype).contiguous()
    acc = sanitised[0]
    for t in sanitised[1:]:
        acc = (acc.float() + t.float()).to(first.dtype)
    return acc.contiguous()


def residual_rms_norm(
    reduced: torch.Tensor,
    residual_in: torch.Tensor,
    rms_gamma: torch.Tensor,
    rms_eps: float,
    weight_bias: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, then RMSNorm of each row, returning ``(residual_out, norm_out)``.

    Unfused equivalent (``D`` = last dimension, fp32 arithmetic, ``rd_T`` = round to ``T``)::

        p = rd_T(float(reduced) + float(residual_in))                  # residual_out
        ms = sum(float(p) ** 2 over the row) / D
        rstd = rsqrt(ms + eps)
        y = rd_T((float(p) * rstd) * (weight_bias + float(rms_gamma)))  # norm_out

    ``reduced`` and ``residual_in``: ``[..., D]`` of one dtype ``T``; ``rms_gamma``: ``[D]``
    (any float dtype, read as fp32). ``weight_bias`` 0.0 is the standard RMSNorm, 1.0 the
    Gemma form ``(1 + gamma)``.
    """
    op = "residual_rms_norm"
    _check_activation(op, "reduced", reduced)
    _check_activation(op, "residual_in", residual_in)
    if residual_in.dtype != reduced.dtype or residual_in.shape != reduced.shape:
        raise ValueError(
            f"{op}: residual_in ({residual_in.dtype}, {tuple(residual_in.shape)}) "
            f"must match reduced ({reduced.dtype}, {tuple(reduced.shape)})"
        )
    hidden = reduced.shape[-1]
    if rms_gamma.numel() != hidden:
        raise ValueError(f"{op}: rms_gamma has {rms_gamma.numel()} elements, expected {hidden}")
    dtype = reduced.dtype
    p = (reduced.float() + residual_in.float()).to(dtype)
    pf = p.float()
    ms = (pf * pf).sum(dim=-1, keepdim=True) / hidden
    rstd = torch.rsqrt(ms + torch.tensor(rms_eps, dtype=torch.float32))
    weight = torch.tensor(weight_bias, dtype=torch.float32) + rms_gamma.reshape(-1).float()
    y = ((pf * rstd) * weight).to(dtype)
    return p, y


def fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even conversion of fp32 values to FP8 E4M3.

    Finite values beyond +-448 become +-448 (never NaN); NaN stays NaN. Returns a
    ``torch.float8_e4m3fn`` tensor of ``x``'s shape.
    """
    return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_fp8_static(y: torch.Tensor, scale_factor) -> torch.Tensor:
    """Static per-tensor FP8 E4M3 quantisation; ``scale_factor`` is the dequantisation scale.

    Unfused equivalent::

        inv = fp32(1.0 / float(scale_factor))      # one reciprocal, fp32
        q = e4m3(float(y) * inv)                   # saturating RNE

    ``scale_factor``: a float or a tensor whose first element is used.
    """
    s = (
        scale_factor.reshape(-1)[0].float().cpu()
        if isinstance(scale_factor, torch.Tensor)
        else torch.tensor(float(scale_factor), dtype=torch.float32)
    )
    inv = (torch.tensor(1.0, dtype=torch.float32) / s).to(y.device)
    return fp8_e4m3(y.float() * inv)


def quantize_fp8_dynamic(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (per-row) FP8 E4M3 quantisation, returning ``(q, scale)``.

    Unfused equivalent, per row ``t`` of ``y`` (``[N, D]``)::

        amax = max_j |float(y[t, j])|
        scale[t] = max(amax / 448, 2**-9 / 448)    # fp32; the minimum keeps zero rows finite
        q[t, j] = e4m3(clamp(float(y[t, j]) / scale[t], -448, 448))

    ``scale`` is ``[N, 1]`` float32 (the dequantisation scale: ``y ~ float(q) * scale``).
    """
    yf = y.float()
    amax = yf.abs().amax(dim=-1, keepdim=True)
    # Divide by a tensor: torch's CUDA kernels turn division by a Python number into a
    # multiply by its rounded reciprocal, which is not the correctly rounded quotient.
    scale = torch.clamp(amax / torch.full_like(amax, FP8_E4M3_MAX), min=DYNAMIC_FP8_MIN_SCALE)
    return fp8_e4m3(yf / scale), scale


def allreduce_fusion_reference(
    inputs: Sequence[torch.Tensor],
    pattern: int,
    *,
    residual_in: torch.Tensor | None = None,
    rms_gamma: torch.Tensor | None = None,
    rms_eps: float = 1e-6,
    scale_factor=None,
    weight_bias: float = 0.0,
    fp32_acc: bool = True,
) -> dict[str, torch.Tensor]:
    """Every output of ``allreduce_fusion`` for patterns 0, 1, 2, 4, 10 and 11.

    Unfused equivalent::

        s = fusion_all_reduce(inputs, fp32_acc)                      # allreduce_out (pattern 0)
        residual_out, y = residual_rms_norm(s, residual_in, rms_gamma, rms_eps, weight_bias)
        norm_out = y                                                 # patterns 1, 4, 11
        quant_out = quantize_fp8_static(y, scale_factor)             # patterns 2, 4
        quant_out, scale_out = quantize_fp8_dynamic(y)               # patterns 10, 11

    ``inputs[q]``: rank q's ``[N, D]`` input; ``residual_in``: ``[N, D]`` (the same on every
    rank in a real model; this function takes one); ``rms_gamma``: ``[D]``. Returns a dict
    holding exactly the outputs the pattern writes, keyed ``allreduce_out``,
    ``residual_out``, ``norm_out``, ``quant_out``, ``scale_out``. The values are the same on
    every rank.
    """
    op = "allreduce_fusion_reference"
    s = fusion_all_reduce(inputs, fp32_acc=fp32_acc)
    if pattern == _P.kAllReduce:
        return {"allreduce_out": s}
    if pattern not in _PATTERNS:
        raise NotImplementedError(
            f"{op}: {pattern_name(pattern)} has no reference here (patterns 0, 1, 2, 4, 10, 11)"
        )
    if residual_in is None or rms_gamma is None:
        raise ValueError(f"{op}: {pattern_name(pattern)} needs residual_in and rms_gamma")
    writes_norm, quant = _PATTERNS[pattern]
    residual_out, y = residual_rms_norm(s, residual_in, rms_gamma, rms_eps, weight_bias)
    out = {"residual_out": residual_out}
    if writes_norm:
        out["norm_out"] = y
    if quant == "static":
        if scale_factor is None:
            raise ValueError(f"{op}: {pattern_name(pattern)} needs scale_factor")
        out["quant_out"] = quantize_fp8_static(y, scale_factor)
    elif quant == "dynamic":
        out["quant_out"], out["scale_out"] = quantize_fp8_dynamic(y)
    return out
