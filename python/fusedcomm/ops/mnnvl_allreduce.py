"""The MNNVL all-reduce ops: frontends over the Lamport fusion kernels.

Each entry point checks its arguments the way the reference API does (ValueError / TypeError
before any launch), allocates the outputs it may allocate, resolves the strategy (AUTO: one-shot
up to 1 MiB of ``N * D * W * elem``, as the reference) and hands one normalised fused call to
``allreduce_fusion._fused_call``, the same path (checks, torch custom op, launch) that the
TRT-LLM-style workspace takes. The sum is always accumulated in fp32 in rank order, one
rounding at the end, so every rank holds the same bits; one-shot and two-shot give the same
sum. RMSNorm and the quantisers are the canonical ones of ``fusedcomm.reference.fusion``.

A call maps onto a fusion pattern: plain all-reduce 0; residual + RMSNorm 1; static FP8 2 (4
with the norm written too); NVFP4 3 (5); dynamic FP8 10 (11).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..enums import AllReduceFusionPattern, QuantizationSFLayout
from ..reference.quant import compute_fp4_swizzled_layout_sf_size
from ..runtime.mnnvl_workspace import (
    MNNVLAllreduceFusionStrategy,
    MNNVLAllReduceFusionWorkspace,
    MNNVLQuantType,
    live_workspace,
    strategy_of,
)
from .allreduce_fusion import _fused_call, register_backend_call

__all__ = [
    "get_allreduce_mnnvl_workspace",
    "mnnvl_unified_call",
    "trtllm_mnnvl_all_reduce",
    "trtllm_mnnvl_allreduce",
    "trtllm_mnnvl_fused_allreduce_add_rmsnorm",
    "trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant",
    "trtllm_mnnvl_fused_allreduce_rmsnorm",
]

_P = AllReduceFusionPattern
_S = MNNVLAllreduceFusionStrategy
_ELEM = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
_FP4_DTYPES = tuple(d for d in (torch.uint8, getattr(torch, "float4_e2m1fn_x2", None)) if d)
# quant type -> (pattern without the norm written, pattern with it)
_QUANT_PATTERNS = {
    MNNVLQuantType.FP8: (_P.kARResidualRMSNormFP8Quant, _P.kARResidualRMSNormOutFP8Quant),
    MNNVLQuantType.NVFP4: (_P.kARResidualRMSNormFP4Quant, _P.kARResidualRMSNormOutFP4Quant),
    MNNVLQuantType.DYNAMIC_FP8: (
        _P.kARResidualRMSNormDynamicFP8Quant,
        _P.kARResidualRMSNormOutDynamicFP8Quant,
    ),
}
_UNIFIED_QUANT = {
    p: (q, norm)
    for q, pair in _QUANT_PATTERNS.items()
    for norm, p in ((False, pair[0]), (True, pair[1]))
}


def _workspace(op: str, workspace: Any) -> MNNVLAllReduceFusionWorkspace:
    if not isinstance(workspace, MNNVLAllReduceFusionWorkspace):
        raise TypeError(
            f"{op}: workspace must be an MNNVLAllReduceFusionWorkspace, got "
            f"{type(workspace).__name__}"
        )
    if workspace.destroyed:
        raise ValueError(f"{op}: the workspace has been destroyed")
    return workspace


def _two_d(op: str, name: str, t: Any, what: str = "tensor") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(
            f"{op}: the {what} ({name}) must be 2D, got {t.dim()}D. The shape is {tuple(t.shape)}."
        )
    return t


def _activation(op: str, x: torch.Tensor) -> None:
    if x.dtype not in _ELEM:
        raise TypeError(f"{op}: dtype ({x.dtype}) must be float16, bfloat16 or float32")


def _same_shape(op: str, name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    if t is not None and tuple(t.shape) != tuple(x.shape):
        raise ValueError(
            f"{op}: {name} shape must match input shape, got {tuple(t.shape)} and {tuple(x.shape)}."
        )


def _gamma(op: str, gamma: Any, hidden: int) -> None:
    if not isinstance(gamma, torch.Tensor):
        raise TypeError(f"{op}: gamma must be a Tensor, got {type(gamma).__name__}")
    if gamma.numel() != hidden:
        raise ValueError(
            f"{op}: the gamma tensor must have the same number of elements as the hidden "
            f"dimension, got {gamma.numel()} elements but expected {hidden} elements."
        )


def _resolve(op: str, ws: MNNVLAllReduceFusionWorkspace, x: torch.Tensor, strategy: Any) -> bool:
    """The strategy as ``use_oneshot`` (True / False); ValueError when the buffer is too
    small for it."""
    n, d = x.shape
    s = strategy_of(op, strategy)
    if s == _S.AUTO:
        s = _S.select_strategy(ws.tp_size, n, d, x.dtype)
    if not ws.is_buffer_size_sufficient(ws.tp_size, n, d, x.dtype, s):
        need = ws.get_required_buffer_size_bytes(ws.tp_size, n, d, x.dtype, s)
        raise ValueError(
            f"{op}: the buffer size in the given workspace is insufficient for the given "
            f"problem size. Buffer: {ws.buffer_size_bytes} bytes, Required: {need} bytes."
        )
    return s == _S.ONESHOT


def _epsilon(op: str, epsilon: Any, dtype: torch.dtype) -> float:
    if epsilon is None:
        return float(torch.finfo(dtype).eps)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise TypeError(f"{op}: epsilon must be a float or None, got {type(epsilon).__name__}")
    return float(epsilon)


def _launch(op, pattern, ws, x, pdl, oneshot, tensors, eps=1e-6, scale=None, layout=0, bias=0.0):
    """One fused call over the workspace's table; ``tensors`` in the order allreduce_out,
    residual_in, residual_out, norm_out, quant_out, scale_out, rms_gamma."""
    n, d = x.shape
    where = (ws.workspace_tensor, ws.tp_size, ws.rank, n, d)
    flags = (pdl, True, True, oneshot)  # fp32 accumulation, always
    _fused_call(op, pattern, x, where, flags, tensors, (eps, scale, layout, None, bias))


def trtllm_mnnvl_allreduce(
    input: torch.Tensor,
    workspace: MNNVLAllReduceFusionWorkspace,
    launch_with_pdl: bool,
    output: torch.Tensor | None = None,
    strategy: MNNVLAllreduceFusionStrategy = MNNVLAllreduceFusionStrategy.AUTO,
) -> torch.Tensor:
    """Sum ``input`` over the workspace's TP group.

    Unfused equivalent::

        output = rd_T(sum over ranks q, in rank order, of float(input_q))   # fp32, one rounding

    ``input``: ``[N, D]`` float16 / bfloat16 / float32 (D a multiple of 16 bytes); ``output``
    (allocated when None) receives it, bitwise identical on every rank. ``strategy``: ONESHOT,
    TWOSHOT or AUTO (one-shot up to 1 MiB of ``N * D * W * elem``). ValueError for non-2-D
    tensors and a buffer too small for the strategy. Returns ``output``.
    """
    op = "trtllm_mnnvl_allreduce"
    ws = _workspace(op, workspace)
    _two_d(op, "input", input, "input tensor")
    _activation(op, input)
    if output is None:
        output = torch.empty_like(input)
    else:
        _two_d(op, "output", output, "output tensor")
    oneshot = _resolve(op, ws, input, strategy)
    _launch(op, _P.kAllReduce, ws, input, launch_with_pdl, oneshot, (output,) + (None,) * 6)
    return output


def trtllm_mnnvl_fused_allreduce_add_rmsnorm(
    input: torch.Tensor,
    residual_in: torch.Tensor,
    gamma: torch.Tensor,
    workspace: MNNVLAllReduceFusionWorkspace,
    epsilon: float | None = None,
    output: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    launch_with_pdl: bool = False,
    strategy: MNNVLAllreduceFusionStrategy = MNNVLAllreduceFusionStrategy.AUTO,
    weight_bias: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-reduce, residual add, RMSNorm.

    Unfused equivalent::

        s = trtllm_mnnvl_allreduce(input)                       # fp32 sum, rank order
        residual_out = rd_T(float(s) + float(residual_in))
        output = rd_T(residual_out * rsqrt(mean(residual_out ** 2) + epsilon)
                      * (weight_bias + gamma))

    ``epsilon`` None is ``torch.finfo(input.dtype).eps``. Outputs are allocated when None;
    every rank holds the same bits. Returns ``(output, residual_out)``.
    """
    op = "trtllm_mnnvl_fused_allreduce_add_rmsnorm"
    ws = _workspace(op, workspace)
    _two_d(op, "input", input, "input tensor")
    _activation(op, input)
    eps = _epsilon(op, epsilon, input.dtype)
    _two_d(op, "residual_in", residual_in, "residual input tensor")
    _gamma(op, gamma, input.shape[1])
    if output is None:
        output = torch.empty_like(input)
    else:
        _two_d(op, "output", output, "output tensor")
    if residual_out is None:
        residual_out = torch.empty_like(residual_in)
    else:
        _two_d(op, "residual_out", residual_out, "residual output tensor")
    oneshot = _resolve(op, ws, input, strategy)
    tensors = (None, residual_in, residual_out, output, None, None, gamma)
    _launch(
        op,
        _P.kARResidualRMSNorm,
        ws,
        input,
        launch_with_pdl,
        oneshot,
        tensors,
        eps,
        bias=weight_bias,
    )
    return output, residual_out


def _quant_outputs(op, quant_type, x, quant_out, scale_out, layout):
    """Check (or allocate) quant_out and scale_out for ``quant_type``."""
    n, d = x.shape
    if quant_type in (MNNVLQuantType.FP8, MNNVLQuantType.DYNAMIC_FP8):
        what = "FP8" if quant_type == MNNVLQuantType.FP8 else "dynamic FP8"
        if quant_out is None:
            quant_out = torch.empty_like(x, dtype=torch.float8_e4m3fn)
        elif tuple(quant_out.shape) != tuple(x.shape):
            raise ValueError(
                f"{op}: quant_out shape must be {tuple(x.shape)} for {what}, got "
                f"{tuple(quant_out.shape)}."
            )
        if quant_out.dtype != torch.float8_e4m3fn:
            raise ValueError(
                f"{op}: quant_out dtype for {what} must be float8_e4m3fn, got {quant_out.dtype}."
            )
        if not quant_out.is_contiguous():
            raise ValueError(f"{op}: quant_out must be contiguous for {what}.")
        if quant_type == MNNVLQuantType.FP8:
            return quant_out, None
        if scale_out is None:
            scale_out = torch.empty((n, 1), dtype=torch.float32, device=x.device)
        elif tuple(scale_out.shape) != (n, 1):
            raise ValueError(
                f"{op}: scale_out shape must be {(n, 1)} for dynamic FP8, got "
                f"{tuple(scale_out.shape)}."
            )
        if scale_out.dtype != torch.float32:
            raise ValueError(
                f"{op}: scale_out dtype for dynamic FP8 must be float32, got {scale_out.dtype}."
            )
        if not scale_out.is_contiguous():
            raise ValueError(f"{op}: scale_out must be contiguous for dynamic FP8.")
        return quant_out, scale_out
    # NVFP4
    if x.dtype == torch.float32:
        raise ValueError(f"{op}: MNNVL NVFP4 quantization requires fp16 or bf16 input.")
    if d % 16:
        raise ValueError(
            f"{op}: MNNVL NVFP4 quantization requires hidden_dim divisible by 16, got {d}."
        )
    if quant_out is None:
        quant_out = torch.empty((n, d // 2), dtype=torch.uint8, device=x.device)
    elif tuple(quant_out.shape) != (n, d // 2):
        raise ValueError(
            f"{op}: quant_out shape must be {(n, d // 2)} for NVFP4, got {tuple(quant_out.shape)}."
        )
    if quant_out.dtype not in _FP4_DTYPES:
        raise ValueError(
            f"{op}: quant_out dtype for NVFP4 must be uint8 or float4_e2m1fn_x2, got "
            f"{quant_out.dtype}."
        )
    if not quant_out.is_contiguous():
        raise ValueError(f"{op}: quant_out must be contiguous for NVFP4.")
    linear = layout == QuantizationSFLayout.LINEAR
    need = n * (d // 16) if linear else compute_fp4_swizzled_layout_sf_size(n, d // 16)
    if scale_out is None:
        shape = (n, d // 16) if linear else (need,)
        scale_out = torch.empty(shape, dtype=torch.float8_e4m3fn, device=x.device)
    elif scale_out.numel() < need:
        raise ValueError(
            f"{op}: scale_out is too small for NVFP4: got {scale_out.numel()} elements, need "
            f"at least {need}."
        )
    if scale_out.dtype != torch.float8_e4m3fn:
        raise ValueError(
            f"{op}: scale_out dtype for NVFP4 must be float8_e4m3fn, got {scale_out.dtype}."
        )
    return quant_out, scale_out


def trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(
    input: torch.Tensor,
    residual_in: torch.Tensor,
    gamma: torch.Tensor,
    workspace: MNNVLAllReduceFusionWorkspace,
    epsilon: float | None = None,
    output: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    quant_out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    output_scale: torch.Tensor | float | None = None,
    layout_code: int = QuantizationSFLayout.SWIZZLED_128x4,
    quant_type: int = MNNVLQuantType.NONE,
    launch_with_pdl: bool = False,
    strategy: MNNVLAllreduceFusionStrategy = MNNVLAllreduceFusionStrategy.AUTO,
    weight_bias: float = 0.0,
):
    """All-reduce, residual add, RMSNorm, then FP8 / NVFP4 quantisation.

    Unfused equivalent::

        output, residual_out = trtllm_mnnvl_fused_allreduce_add_rmsnorm(...)   # output: y
        quant_out = e4m3(y / output_scale)                                # FP8 (static)
        quant_out, scale_out = nvfp4(y, global_scale=output_scale)        # NVFP4
        quant_out, scale_out = e4m3 per token, scale_out[t] = amax_t / 448   # DYNAMIC_FP8

    ``output`` (the norm) is written only when given. ``output_scale``: float or tensor (None:
    1.0; ignored for DYNAMIC_FP8). ``quant_out``: FP8 ``[N, D]`` float8_e4m3fn; NVFP4
    ``[N, D/2]`` uint8 / float4_e2m1fn_x2. ``scale_out``: dynamic ``[N, 1]`` float32; NVFP4
    float8_e4m3fn of at least ``N * D / 16`` (LINEAR) or the swizzled size (SWIZZLED_128x4)
    elements; SWIZZLED_8x4 is refused. Missing outputs are allocated. Returns ``(quant_out,
    scale_out, residual_out, output)`` (``scale_out`` None for static FP8).
    """
    op = "trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant"
    ws = _workspace(op, workspace)
    _two_d(op, "input", input, "input tensor")
    _activation(op, input)
    eps = _epsilon(op, epsilon, input.dtype)
    if isinstance(quant_type, bool) or quant_type not in _QUANT_PATTERNS:
        raise ValueError(f"{op}: Unsupported MNNVL quant_type: {quant_type}")
    _two_d(op, "residual_in", residual_in, "residual input tensor")
    _same_shape(op, "residual_in", residual_in, input)
    _gamma(op, gamma, input.shape[1])
    if layout_code == QuantizationSFLayout.SWIZZLED_8x4:
        raise ValueError(
            f"{op}: MNNVL NVFP4 quantization supports SWIZZLED_128x4 or LINEAR scale layouts, "
            "not SWIZZLED_8x4."
        )
    if isinstance(layout_code, bool) or layout_code not in (0, 2):
        raise ValueError(f"{op}: layout_code ({layout_code!r}) must be SWIZZLED_128x4 or LINEAR")
    if residual_out is None:
        residual_out = torch.empty_like(input)
    _same_shape(op, "residual_out", residual_out, input)
    _same_shape(op, "output", output, input)
    quant_out, scale_out = _quant_outputs(op, quant_type, input, quant_out, scale_out, layout_code)
    for name, t in (
        ("residual_in", residual_in),
        ("gamma", gamma),
        ("output", output),
        ("residual_out", residual_out),
        ("quant_out", quant_out),
        ("scale_out", scale_out),
    ):
        if t is not None and t.device != input.device:
            raise ValueError(f"{op}: {name} must be on {input.device}, got {t.device}.")
    scale = None
    if quant_type != MNNVLQuantType.DYNAMIC_FP8:
        scale = 1.0 if output_scale is None else output_scale
        if isinstance(scale, torch.Tensor):
            if scale.numel() < 1:
                raise ValueError(f"{op}: output_scale must contain at least one element")
            scale = scale.reshape(-1)[:1].to(device=input.device, dtype=torch.float32)
    oneshot = _resolve(op, ws, input, strategy)
    pattern = _QUANT_PATTERNS[quant_type][output is not None]
    tensors = (None, residual_in, residual_out, output, quant_out, scale_out, gamma)
    _launch(
        op,
        pattern,
        ws,
        input,
        launch_with_pdl,
        oneshot,
        tensors,
        eps,
        scale,
        int(layout_code),
        weight_bias,
    )
    return quant_out, scale_out, residual_out, output


# ------------------------------------------------------------------------------------------
# The unified API's MNNVL branch


def mnnvl_unified_call(op: str, input, workspace, pattern: int, **kw) -> torch.Tensor:
    """``allreduce_fusion`` on an MNNVL workspace (patterns 0, 1, 2, 3, 4, 5, 10, 11).

    ``use_oneshot`` picks ONESHOT / TWOSHOT / AUTO (None); ``scale_factor`` is the
    ``output_scale``; ``layout_code`` None is SWIZZLED_128x4; ``trigger_completion_at_end``
    and ``fp32_acc`` do not apply (the sum is always fp32). Returns ``output`` (0),
    ``norm_out`` (1) or ``quant_out`` (quantising patterns).
    """
    strategy = strategy_of(op, kw.get("use_oneshot"))
    if isinstance(pattern, bool) or pattern not in (0, 1, *_UNIFIED_QUANT):
        raise ValueError(
            f"{op}: MNNVL AllReduce fusion does not support pattern {pattern} (it runs patterns "
            "0, 1, 2, 3, 4, 5, 10 and 11); use the trtllm backend's workspace for it"
        )
    layout = kw.get("layout_code")
    layout = QuantizationSFLayout.SWIZZLED_128x4 if layout is None else layout
    if pattern in _UNIFIED_QUANT and layout == QuantizationSFLayout.SWIZZLED_8x4:
        raise ValueError(
            f"{op}: MNNVL quantization fusion supports SWIZZLED_128x4 or LINEAR scale layouts, "
            "not SWIZZLED_8x4"
        )
    pdl = kw.get("launch_with_pdl", False)
    if pattern == _P.kAllReduce:
        output = kw.get("output")
        return trtllm_mnnvl_allreduce(input, workspace, pdl, output, strategy)
    residual_in, gamma = kw.get("residual_in"), kw.get("rms_gamma")
    for name, value in (("residual_in", residual_in), ("rms_gamma", gamma)):
        if value is None:
            raise ValueError(f"{op}: MNNVL AllReduce+RMSNorm fusion requires {name}")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a Tensor, got {type(input).__name__}")
    residual_out, norm_out = kw.get("residual_out"), kw.get("norm_out")
    eps, bias = kw.get("rms_eps", 1e-6), kw.get("weight_bias", 0.0)
    if pattern == _P.kARResidualRMSNorm:
        norm_out = torch.empty_like(input) if norm_out is None else norm_out
        residual_out = torch.empty_like(input) if residual_out is None else residual_out
        trtllm_mnnvl_fused_allreduce_add_rmsnorm(
            input, residual_in, gamma, workspace, eps, norm_out, residual_out, pdl, strategy, bias
        )
        return norm_out
    quant_type, with_norm = _UNIFIED_QUANT[pattern]
    quant_out, scale_out = kw.get("quant_out"), kw.get("scale_out")
    if quant_type == MNNVLQuantType.DYNAMIC_FP8:
        for name, value in (
            ("residual_out", residual_out),
            ("quant_out", quant_out),
            ("scale_out", scale_out),
        ):
            if value is None:
                raise ValueError(f"{op}: {name} is required for MNNVL dynamic FP8 patterns")
        if with_norm and norm_out is None:
            raise ValueError(f"{op}: norm_out is required for MNNVL dynamic FP8 norm-out pattern")
    elif with_norm and norm_out is None:
        norm_out = torch.empty_like(input)
    residual_out = torch.empty_like(input) if residual_out is None else residual_out
    q, _, _, _ = trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(
        input,
        residual_in,
        gamma,
        workspace,
        eps,
        norm_out if with_norm else None,
        residual_out,
        quant_out,
        scale_out,
        kw.get("scale_factor"),
        layout,
        quant_type,
        pdl,
        strategy,
        bias,
    )
    return q


# ------------------------------------------------------------------------------------------
# Deprecated pointer entry points

_warned: set[str] = set()


def _deprecated(op: str, instead: str) -> None:
    if op not in _warned:
        _warned.add(op)
        warnings.warn(f"{op} is deprecated; use {instead}", DeprecationWarning, stacklevel=3)


def get_allreduce_mnnvl_workspace(
    mapping: Any,
    dtype: torch.dtype,
    comm_backend_for_handle_transfer: Any = None,
    buffer_size_in_bytes: int | None = None,
) -> tuple[MNNVLAllReduceFusionWorkspace, torch.Tensor, int]:
    """Create a workspace for the deprecated pointer entry points (deprecated).

    The Lamport buffer size is ``buffer_size_in_bytes`` (default 12 000 000) rounded up to a
    multiple of ``286720 * 3 * 2 * elem`` (286720: the LCM of the common hidden sizes 2048,
    4096, 5120, 7168, 8192). Collective. Returns ``(workspace, workspace.buffer_flags,
    max_num_elements)`` with ``max_num_elements = buffer_size_bytes // (3 * 2 * elem)``; the
    pointer entry points take ``buffer_M = max_num_elements // hidden_dim``.
    """
    _deprecated("get_allreduce_mnnvl_workspace", "MNNVLAllReduceFusionWorkspace")
    op = "get_allreduce_mnnvl_workspace"
    if dtype not in _ELEM:
        raise TypeError(f"{op}: dtype ({dtype}) must be float16, bfloat16 or float32")
    stride = 3 * 2 * dtype.itemsize
    unit = 286720 * stride
    target = 12_000_000 if buffer_size_in_bytes is None else buffer_size_in_bytes
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"{op}: buffer_size_in_bytes ({target!r}) must be a positive int")
    ws = MNNVLAllReduceFusionWorkspace(
        mapping,
        buffer_size_in_bytes=-(-target // unit) * unit,
        comm_backend=comm_backend_for_handle_transfer,
    )
    return ws, ws.buffer_flags, ws.buffer_size_bytes // stride


def _pointer_call(op, inp, buffer_ptrs_dev, buffer_m, flags, nranks, rank):
    _two_d(op, "inp", inp, "input tensor")
    if isinstance(buffer_m, bool) or not isinstance(buffer_m, int):
        raise TypeError(f"{op}: buffer_M must be an int, got {type(buffer_m).__name__}")
    if inp.shape[0] > buffer_m:
        raise ValueError(
            f"{op}: the number of tokens in the input tensor {inp.shape[0]} is greater than the "
            f"buffer_M {buffer_m}. This is not supported. Please increase the workspace size, "
            f"or decrease the amount of tokens to at most {buffer_m}."
        )
    ws = live_workspace(op, buffer_ptrs_dev, flags)
    if (nranks, rank) != (ws.tp_size, ws.rank):
        raise ValueError(
            f"{op}: nranks / rank ({nranks}, {rank}) differ from the workspace's "
            f"({ws.tp_size}, {ws.rank})"
        )
    return ws


def trtllm_mnnvl_all_reduce(
    inp: torch.Tensor,
    multicast_buffer_ptr: int,
    buffer_ptrs_dev: int,
    buffer_M: int,
    buffer_flags_mnnvl: torch.Tensor,
    nranks: int,
    rank: int,
    wait_for_results: bool,
    launch_with_pdl: bool,
    out: torch.Tensor | None = None,
) -> None:
    """Two-shot all-reduce of ``inp`` into ``out`` (deprecated: use trtllm_mnnvl_allreduce).

    The pointers are a workspace's (``mc_ptr``, ``uc_ptrs_dev``; from
    get_allreduce_mnnvl_workspace); ``buffer_M`` bounds the token count. ValueError for a
    non-2-D ``inp``, more than ``buffer_M`` tokens, or ``wait_for_results`` False / ``out``
    None (the reference asserts both).
    """
    op = "trtllm_mnnvl_all_reduce"
    _deprecated(op, "trtllm_mnnvl_allreduce")
    ws = _pointer_call(op, inp, buffer_ptrs_dev, buffer_M, buffer_flags_mnnvl, nranks, rank)
    if not (wait_for_results and out is not None):
        raise ValueError(
            f"{op}: wait_for_results=False (or no out) is not supported; use trtllm_mnnvl_allreduce"
        )
    trtllm_mnnvl_allreduce(inp, ws, launch_with_pdl, out, _S.TWOSHOT)


def trtllm_mnnvl_fused_allreduce_rmsnorm(
    prenorm_output: torch.Tensor,
    normed_output: torch.Tensor,
    shard_input: torch.Tensor,
    multicast_buffer_ptr: int,
    buffer_ptrs_dev: int,
    unicast_ptr: int,
    buffer_M: int,
    buffer_flags_mnnvl: torch.Tensor,
    nranks: int,
    rank: int,
    gamma: torch.Tensor,
    epsilon: float,
    residual: torch.Tensor,
    launch_with_pdl: bool,
) -> None:
    """Two-shot all-reduce + residual + RMSNorm (deprecated: use
    trtllm_mnnvl_fused_allreduce_add_rmsnorm): ``prenorm_output = AR(shard_input) +
    residual``, ``normed_output = RMSNorm(prenorm_output) * gamma``."""
    op = "trtllm_mnnvl_fused_allreduce_rmsnorm"
    _deprecated(op, "trtllm_mnnvl_fused_allreduce_add_rmsnorm")
    ws = _pointer_call(op, shard_input, buffer_ptrs_dev, buffer_M, buffer_flags_mnnvl, nranks, rank)
    _two_d(op, "residual", residual, "residual input tensor")
    _gamma(op, gamma, shard_input.shape[1])
    _two_d(op, "normed_output", normed_output, "output tensor")
    _two_d(op, "prenorm_output", prenorm_output, "prenorm output tensor")
    trtllm_mnnvl_fused_allreduce_add_rmsnorm(
        shard_input,
        residual,
        gamma,
        ws,
        epsilon,
        normed_output,
        prenorm_output,
        launch_with_pdl,
        _S.TWOSHOT,
    )


register_backend_call("mnnvl", mnnvl_unified_call)
