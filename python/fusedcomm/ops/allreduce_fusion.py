"""All-reduce fused with residual add, RMSNorm and FP8 quantisation (the Lamport family).

Frontends only: each entry point checks its arguments (every check runs before any launch),
normalises them, and hands one :class:`~fusedcomm.ops._fusion_launch.FusionCall` to
``_fusion_launch.launch``. Eager calls run the implementation directly; while torch.compile
traces, the registered op ``fusedcomm::allreduce_fusion`` is called instead (its schema marks
every output as written), so the fused call also works inside ``torch.compile(fullgraph=True)``
and CUDA graphs.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

# the shared argument checks under this family's short names (ops/allreduce_legacy.py too)
from .._checks import ELEMENT_SIZE as _ELEM
from .._checks import bool_arg as _flag
from .._checks import contiguous_on as _tensor
from .._checks import element_size as _elem
from .._checks import int_arg as _int
from .._checks import real_arg as _real
from .._checks import tensor_arg as _is_tensor
from ..enums import (
    AllReduceFusionPattern,
    QuantizationSFLayout,
    pattern_name,
)
from ..reference.quant import scale_factor_buffer_size
from ..runtime.fusion_workspace import (
    AllReduceFusionWorkspace,
    TRTLLMAllReduceFusionWorkspace,
    check_group_shape,
    metadata_problems,
)
from . import _fusion_launch
from ._fusion_launch import MAX_ROW_BYTES
from ._register import register_op, tracing
from .moe_fusion import moe_unified_call

__all__ = ["allreduce_fusion", "trtllm_allreduce_fusion"]

_P = AllReduceFusionPattern
_MAX_QUANT_GROUPS = 8192  # per-token-group FP8: groups per row (kMaxQuantGroups)
_LAYOUT_NAMES = ("SWIZZLED_128x4", "SWIZZLED_8x4", "LINEAR")  # QuantizationSFLayout values
_ACT = "act"  # an [N, D] tensor of the input's dtype
_NVFP4 = (_P.kARResidualRMSNormFP4Quant, _P.kARResidualRMSNormOutFP4Quant)
_GROUP_FP8 = (
    _P.kARResidualRMSNormPerTokenGroupFP8PackedQuant,
    _P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant,
)
_DYNAMIC_FP8 = (_P.kARResidualRMSNormDynamicFP8Quant, _P.kARResidualRMSNormOutDynamicFP8Quant)
_STATIC_FP8 = (_P.kARResidualRMSNormFP8Quant, _P.kARResidualRMSNormOutFP8Quant)
_MOE = (_P.kMoEReductionARResidualRMSNorm, _P.kMoEFinalizeARResidualRMSNorm)

# What each non-MoE pattern reads and always writes (must be given) besides the input.
_NORM = ("residual_in", "rms_gamma", "residual_out")
_NEEDS = {
    _P.kAllReduce: ("allreduce_out",),
    _P.kARResidualRMSNorm: _NORM + ("norm_out",),
    _P.kARResidualRMSNormFP8Quant: _NORM + ("quant_out", "scale_factor"),
    _P.kARResidualRMSNormFP4Quant: _NORM + ("quant_out", "scale_out", "scale_factor"),
    _P.kARResidualRMSNormOutFP8Quant: _NORM + ("norm_out", "quant_out", "scale_factor"),
    _P.kARResidualRMSNormOutFP4Quant: _NORM
    + ("norm_out", "quant_out", "scale_out", "scale_factor"),
    _P.kARResidualRMSNormPerTokenGroupFP8PackedQuant: _NORM
    + ("quant_out", "scale_out", "block_quant_group_size"),
    _P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant: _NORM
    + ("norm_out", "quant_out", "scale_out", "block_quant_group_size"),
    _P.kARResidualRMSNormDynamicFP8Quant: _NORM + ("quant_out", "scale_out"),
    _P.kARResidualRMSNormOutDynamicFP8Quant: _NORM + ("norm_out", "quant_out", "scale_out"),
}
# The optional tensors of the op, in schema order (rms_gamma closes the run), and which of
# them each pattern passes on to the kernel (only what it reads or writes).
_TENSOR_ARGS = (
    "allreduce_out",
    "residual_in",
    "residual_out",
    "norm_out",
    "quant_out",
    "scale_out",
    "rms_gamma",
)
_SLOT = {name: i for i, name in enumerate(_TENSOR_ARGS)}
_KEEP = {p: tuple(k in needs for k in _TENSOR_ARGS) for p, needs in _NEEDS.items()}
_CALL_NAMES = ("world_size", "world_rank", "token_num")  # as check_group_shape reports them


def _pattern_arg(op: str, pattern: Any) -> int:
    if isinstance(pattern, bool) or not isinstance(pattern, int):
        raise TypeError(
            f"{op}: pattern must be an int (AllReduceFusionPattern), got {type(pattern).__name__}"
        )
    if pattern == _P.kMoEFinalizeARResidualRMSNormFP8Quant:
        raise ValueError(
            f"{op}: {pattern_name(pattern)} exists only in a CuTe-DSL backend for "
            "SM100 that fusedcomm does not provide; use kMoEFinalizeARResidualRMSNorm"
        )
    if pattern not in _NEEDS and pattern not in _MOE:
        raise ValueError(
            f"{op}: pattern ({pattern}) must be an AllReduceFusionPattern value (0..11)"
        )
    return pattern


def _rows(op: str, name: str, t: Any, x: torch.Tensor, numel: int) -> torch.Tensor:
    _tensor(op, name, t, x.device)
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name}.dtype ({t.dtype}) must be the input's ({x.dtype})")
    if t.numel() != numel:
        raise ValueError(
            f"{op}: {name} has {t.numel()} elements, expected token_num * hidden_dim = {numel}"
        )
    return t


def _holds(
    op: str, name: str, t: Any, x: torch.Tensor, dtype: torch.dtype, count: int, what: str
) -> None:
    """``t``: a tensor on the input's device of ``count`` elements of ``dtype``; ``what``
    describes that (``{}`` stands for ``count``)."""
    _tensor(op, name, t, x.device)
    if t.dtype != dtype or t.numel() != count:
        raise ValueError(
            f"{op}: {name} must hold {what.format(count)}, got {t.numel()} of {t.dtype}"
        )


def _scale_factor_tensor(op: str, s: Any, device: torch.device) -> torch.Tensor:
    """A 1-element fp32 tensor on ``device``; a tensor is read on the device (graph-safe)."""
    if isinstance(s, torch.Tensor):
        if s.device != device:
            raise ValueError(
                f"{op}: scale_factor is on {s.device}, the input on {device}; "
                "pass a tensor on the input's device (or a float)"
            )
        if s.numel() < 1:
            raise ValueError(f"{op}: scale_factor is an empty tensor")
        if not (s.is_floating_point() and s.dtype.itemsize >= 2):
            raise TypeError(f"{op}: scale_factor.dtype ({s.dtype}) must be a float dtype")
        return s.reshape(-1)[:1].to(torch.float32).contiguous()
    return torch.full((1,), _real(op, "scale_factor", s), dtype=torch.float32, device=device)


def _check_fusion(
    op: str,
    pattern: int,
    x: torch.Tensor,
    where: tuple,
    tensors: tuple,
    scale_factor: Any,
    block_quant_group_size: Any,
    layout_code: Any,
) -> int:
    """Every argument check of one fused call after the input's type and dtype (which the
    entry points check); returns the layout code to use. ``where`` and ``tensors`` as in
    :func:`_fused_call`."""
    workspace_ptrs, world_size, rank, token_num, hidden_dim = where
    elem = _ELEM[x.dtype]
    check_group_shape(op, _CALL_NAMES, world_size, rank, token_num, hidden_dim, 0)
    if hidden_dim * elem % 16:
        raise ValueError(
            f"{op}: hidden_dim ({hidden_dim}) must be a multiple of {16 // elem} for {x.dtype}"
        )
    if hidden_dim * elem > MAX_ROW_BYTES:
        raise ValueError(
            f"{op}: hidden_dim ({hidden_dim}) must be <= {MAX_ROW_BYTES // elem} for {x.dtype}"
        )
    numel = token_num * hidden_dim
    if x.numel() != numel:
        raise ValueError(
            f"{op}: the input has {x.numel()} elements, expected token_num * "
            f"hidden_dim = {token_num} * {hidden_dim} = {numel}"
        )
    _tensor(op, "allreduce_in", x, x.device)
    ptrs = _tensor(op, "workspace_ptrs", workspace_ptrs, x.device)
    if ptrs.dtype != torch.int64 or ptrs.numel() != 3 * world_size + 1:
        raise ValueError(
            f"{op}: workspace_ptrs must be the int64 pointer table of "
            f"3 * world_size + 1 = {3 * world_size + 1} entries, got "
            f"{ptrs.dtype} with {ptrs.numel()}"
        )
    for name in _NEEDS[pattern]:
        if name == "block_quant_group_size":
            if block_quant_group_size is None:
                raise ValueError(f"{op}: {pattern_name(pattern)} needs block_quant_group_size")
        elif (tensors[_SLOT[name]] if name in _SLOT else scale_factor) is None:
            raise ValueError(f"{op}: {pattern_name(pattern)} writes or reads {name}: pass it")
    allreduce_out, residual_in, residual_out, norm_out, q, sf, gamma = tensors
    if pattern != _P.kAllReduce:
        for name, t in (
            ("residual_in", residual_in),
            ("residual_out", residual_out),
            ("norm_out", norm_out),
        ):
            if t is not None:
                _rows(op, name, t, x, numel)
        gamma = _tensor(op, "rms_gamma", gamma, x.device)
        if gamma.dtype != x.dtype:
            raise TypeError(
                f"{op}: rms_gamma.dtype ({gamma.dtype}) must be the input's ({x.dtype})"
            )
        if gamma.numel() != hidden_dim:
            raise ValueError(
                f"{op}: rms_gamma has {gamma.numel()} elements, expected hidden_dim ({hidden_dim})"
            )
    elif allreduce_out is not None:
        _rows(op, "allreduce_out", allreduce_out, x, numel)
    if pattern in _STATIC_FP8 or pattern in _DYNAMIC_FP8 or pattern in _GROUP_FP8:
        _holds(op, "quant_out", q, x, torch.float8_e4m3fn, numel, "{} float8_e4m3fn elements")
    if pattern in _DYNAMIC_FP8:
        _holds(op, "scale_out", sf, x, torch.float32, token_num, "token_num ({}) float32 scales")
    if pattern in _NVFP4:
        if elem != 2:
            raise TypeError(
                f"{op}: {pattern_name(pattern)} needs float16 or bfloat16 input, got {x.dtype}"
            )
        if hidden_dim % 16:
            raise ValueError(
                f"{op}: {pattern_name(pattern)} needs hidden_dim ({hidden_dim}) "
                "to be a multiple of 16"
            )
        _tensor(op, "quant_out", q, x.device)
        if q.numel() * q.element_size() != numel // 2:
            raise ValueError(
                f"{op}: quant_out must hold {numel // 2} bytes (two FP4 values "
                f"per byte), got {q.numel() * q.element_size()}"
            )
    layout = QuantizationSFLayout.SWIZZLED_128x4 if layout_code is None else layout_code
    if isinstance(layout, bool) or layout not in (0, 1, 2):
        raise ValueError(
            f"{op}: layout_code ({layout_code!r}) must be a QuantizationSFLayout "
            "value (0, 1, 2) or None"
        )
    if pattern in _NVFP4:
        _nvfp4_scales(op, sf, x, token_num, hidden_dim, int(layout))
    if pattern in _GROUP_FP8:
        _group_scales(op, sf, x, token_num, hidden_dim, block_quant_group_size)
    return int(layout)


def _nvfp4_scales(op: str, sf: Any, x: torch.Tensor, n: int, d: int, layout: int) -> None:
    """scale_out of an NVFP4 pattern: a contiguous tensor (any dtype) of at least the layout's
    bytes for n rows of d / 16 scale factors."""
    _tensor(op, "scale_out", sf, x.device)
    need = scale_factor_buffer_size(n, d // 16, layout)
    have = sf.numel() * sf.element_size()
    if have < need:
        raise ValueError(
            f"{op}: scale_out holds {have} bytes; {_LAYOUT_NAMES[layout]} needs "
            f"{need} for {n} rows of {d // 16} scale factors"
        )


def _group_scales(op: str, sf: Any, x: torch.Tensor, n: int, d: int, group: Any) -> None:
    """scale_out of a per-token-group FP8 pattern: int32 (n, K) with strides (1, M)."""
    g = _int(op, "block_quant_group_size", group, 1)
    if d % g:
        raise ValueError(f"{op}: block_quant_group_size ({g}) must divide hidden_dim ({d})")
    if d // g > _MAX_QUANT_GROUPS:
        raise ValueError(
            f"{op}: hidden_dim / block_quant_group_size ({d // g}) must be at most "
            f"{_MAX_QUANT_GROUPS} groups per token"
        )
    _is_tensor(op, "scale_out", sf)
    if sf.device != x.device:
        raise ValueError(f"{op}: scale_out is on {sf.device}, the input on {x.device}")
    k, m = (d // g + 3) // 4, (n + 3) // 4 * 4
    strides_ok = sf.dim() == 2 and sf.stride(0) == 1 and (k == 1 or sf.stride(1) == m)
    if sf.dtype != torch.int32 or tuple(sf.shape) != (n, k) or not strides_ok:
        raise ValueError(
            f"{op}: scale_out must be int32 of shape ({n}, {k}) with strides (1, {m}) "
            "(packed UE8M0 scales, column-major with rows padded to a multiple of 4), got "
            f"{sf.dtype} of shape {tuple(sf.shape)} with strides {tuple(sf.stride())}"
        )


# ------------------------------------------------------------------------------------------
# The registered op and its implementation


def _fusion_impl(*args) -> None:
    """The op's implementation; ``args`` in schema order. FusionCall lists the arguments after
    hidden_dim in that same order."""
    x, workspace_ptrs, world_size, rank, pattern, token_num, hidden_dim, *rest = args
    if token_num == 0:
        return
    _fusion_launch.launch(
        _fusion_launch.FusionCall(
            pattern, x, token_num, hidden_dim, world_size, rank, workspace_ptrs, *rest
        )
    )


def _fusion_fake(*args) -> None:
    return None


_fusion_op = register_op(
    "allreduce_fusion(Tensor allreduce_in, Tensor workspace_ptrs, int world_size, "
    "int world_rank, int pattern, int token_num, int hidden_dim, bool launch_with_pdl, "
    "bool trigger_completion_at_end, bool fp32_acc, bool? use_oneshot, "
    "Tensor(a!)? allreduce_out, Tensor? residual_in, Tensor(b!)? residual_out, "
    "Tensor(c!)? norm_out, Tensor(d!)? quant_out, Tensor(e!)? scale_out, Tensor? rms_gamma, "
    "float rms_eps, Tensor? scale_factor, int layout_code, float weight_bias, "
    "int? block_quant_group_size) -> ()",
    _fusion_impl,
    _fusion_fake,
)


def _fused_call(
    op: str, pattern: int, x: torch.Tensor, where: tuple, flags: tuple, tensors: tuple, scalars
) -> None:
    """Check everything, then launch (every pattern but the MoE ones, 6 and 7).

    ``x`` is a tensor of a supported dtype (the entry points check both). ``where``:
    (workspace_ptrs, world_size, rank, token_num, hidden_dim); ``flags``: (launch_with_pdl,
    trigger_completion_at_end, fp32_acc, use_oneshot); ``tensors``: the optional tensors in
    ``_TENSOR_ARGS`` order; ``scalars``: (rms_eps, scale_factor, layout_code,
    block_quant_group_size, weight_bias).
    """
    launch_with_pdl, trigger_completion_at_end, fp32_acc, use_oneshot = flags
    rms_eps, scale_factor, layout_code, block_quant_group_size, weight_bias = scalars
    layout = _check_fusion(
        op, pattern, x, where, tensors, scale_factor, block_quant_group_size, layout_code
    )
    pdl = _flag(op, "launch_with_pdl", launch_with_pdl)
    trigger = _flag(op, "trigger_completion_at_end", trigger_completion_at_end)
    acc = _flag(op, "fp32_acc", fp32_acc)
    if use_oneshot is not None:
        _flag(op, "use_oneshot", use_oneshot)
    eps = 0.0 if rms_eps is None else _real(op, "rms_eps", rms_eps)
    bias = 0.0 if weight_bias is None else _real(op, "weight_bias", weight_bias)
    sf = None
    if pattern in _STATIC_FP8 or pattern in _NVFP4:
        sf = _scale_factor_tensor(op, scale_factor, x.device)
    group = None if block_quant_group_size is None else int(block_quant_group_size)
    workspace_ptrs, world_size, rank, token_num, hidden_dim = where
    args = (
        x,
        workspace_ptrs,
        world_size,
        rank,
        pattern,
        token_num,
        hidden_dim,
        pdl,
        trigger,
        acc,
        use_oneshot,
        *[t if keep else None for t, keep in zip(tensors, _KEEP[pattern])],
        eps,
        sf,
        layout,
        bias,
        group,
    )
    if tracing():
        _fusion_op(*args)
    else:
        _fusion_impl(*args)


# ------------------------------------------------------------------------------------------
# Public entry points

_warned: set[str] = set()


def _deprecated_once(op: str, instead: str) -> None:
    if op not in _warned:
        _warned.add(op)
        warnings.warn(f"{op} is deprecated; use {instead}", DeprecationWarning, stacklevel=3)


def trtllm_allreduce_fusion(
    allreduce_in,
    world_size,
    world_rank,
    token_num,
    hidden_dim,
    workspace_ptrs,
    launch_with_pdl,
    trigger_completion_at_end,
    fp32_acc,
    pattern_code,
    use_oneshot,
    allreduce_out,
    residual_in,
    residual_out,
    norm_out,
    quant_out,
    scale_out,
    rms_gamma,
    rms_eps,
    scale_factor,
    layout_code,
    metadata=None,
    block_quant_group_size=None,
    weight_bias=None,
) -> None:
    """All-reduce ``allreduce_in`` over the workspace's ranks, then the pattern's epilogue.

    Unfused equivalent (``pattern_code`` decides which lines run and which outputs exist)::

        s = sum over ranks q (in rank order) of allreduce_in_q    # fp32 when fp32_acc
        allreduce_out = s                                          # pattern 0
        residual_out = s + residual_in                             # patterns 1-5, 8-11
        norm_out = rms_norm(residual_out, rms_gamma, rms_eps, weight_bias)
        quant_out = fp8(norm_out / scale_factor)                   # patterns 2, 4
        quant_out, scale_out = nvfp4(norm_out, scale_factor)       # patterns 3, 5
        quant_out, scale_out = fp8_per_group(norm_out, group)      # patterns 8, 9
        quant_out, scale_out = fp8_per_token(norm_out)             # patterns 10, 11

    Every rounding step is spelled out in ``fusedcomm.reference.fusion``. Results are bitwise
    identical on every rank. ``allreduce_in`` and the outputs are contiguous tensors of
    ``token_num * hidden_dim`` elements (any shape) on the device of ``workspace_ptrs``
    (the pointer table of trtllm_create_ipc_workspace_for_all_reduce_fusion); dtype
    float16, bfloat16 or float32; ``quant_out`` float8_e4m3fn (NVFP4: any dtype holding
    ``token_num * hidden_dim / 2`` bytes, two E2M1 codes per byte); ``scale_out``: (10, 11)
    ``token_num`` float32 values, (3, 5) the E4M3 block scales in the ``layout_code`` layout
    (at least ``fusedcomm.reference.scale_factor_buffer_size`` bytes; swizzle padding is not
    written), (8, 9) the packed UE8M0 int32 ``(N, K)`` tensor with strides ``(1, M)``.
    Outputs may be the inputs themselves (in place).
    ``use_oneshot``: True Lamport one-shot, False two-shot, None the planner decides.
    ``scale_factor``: the FP8 dequantisation scale, a float or a CUDA tensor read on the
    device (so graph replays see new values); for NVFP4 the global scale (it multiplies).
    ``block_quant_group_size`` (8, 9): any group size that divides ``hidden_dim``.
    ``metadata``: when given, the call is checked
    against the workspace (one ValueError naming every mismatch). ``rms_eps=None`` is 0,
    ``weight_bias=None`` is 0, ``layout_code=None`` is SWIZZLED_128x4. Patterns 6 and 7 run
    through the MoE entry points; 12 raises ValueError.
    """
    op = "trtllm_allreduce_fusion"
    if not tracing():
        _deprecated_once(op, "allreduce_fusion")
    pattern = _pattern_arg(op, pattern_code)
    if pattern in _MOE:
        raise ValueError(
            f"{op}: {pattern_name(pattern)} takes the MoE inputs: call "
            "trtllm_moe_allreduce_fusion / trtllm_moe_finalize_allreduce_fusion (or "
            "allreduce_fusion) instead"
        )
    if metadata is not None and isinstance(allreduce_in, torch.Tensor):
        problems = metadata_problems(
            metadata, world_size, token_num, hidden_dim, allreduce_in.dtype
        )
        if problems:
            raise ValueError(f"{op}: the call does not fit the workspace: " + "; ".join(problems))
    _is_tensor(op, "allreduce_in", allreduce_in)
    _elem(op, allreduce_in.dtype)
    where = (workspace_ptrs, world_size, world_rank, token_num, hidden_dim)
    flags = (launch_with_pdl, trigger_completion_at_end, fp32_acc, use_oneshot)
    tensors = (allreduce_out, residual_in, residual_out, norm_out, quant_out, scale_out, rms_gamma)
    scalars = (rms_eps, scale_factor, layout_code, block_quant_group_size, weight_bias)
    _fused_call(op, pattern, allreduce_in, where, flags, tensors, scalars)


# allreduce_fusion on other backends' workspaces, by ``workspace.backend``; each backend's
# frontend registers its call (ops/mnnvl_allreduce.py registers "mnnvl"), so this module
# imports none of them.
_BACKEND_CALLS: dict[str, Any] = {}


def register_backend_call(name: str, call: Any) -> None:
    """Make ``allreduce_fusion`` on a workspace whose ``backend`` is ``name`` call ``call``."""
    _BACKEND_CALLS[name] = call


def allreduce_fusion(
    input: torch.Tensor,
    workspace: AllReduceFusionWorkspace,
    pattern: int,
    launch_with_pdl: bool = False,
    trigger_completion_at_end: bool = True,
    output=None,
    residual_out=None,
    norm_out=None,
    quant_out=None,
    scale_out=None,
    residual_in=None,
    rms_gamma=None,
    rms_eps: float = 1e-6,
    scale_factor=None,
    layout_code=None,
    use_oneshot=None,
    fp32_acc: bool = False,
    moe_reduction_device_num_experts=None,
    moe_reduction_scale_input=None,
    moe_reduction_active_experts_token_input=None,
    moe_reduction_token_input=None,
    expanded_idx_to_permuted_idx=None,
    expert_scale_factor=None,
    shared_expert_output=None,
    block_quant_group_size=None,
    weight_bias: float = 0.0,
) -> torch.Tensor:
    """All-reduce ``input`` over the workspace's group, fused with the pattern's epilogue.

    Unfused equivalent::

        s = sum over ranks q (in rank order) of input_q     # fp32 when fp32_acc
        output = s                                          # kAllReduce (0)
        residual_out = s + residual_in                      # every other pattern
        norm_out = rms_norm(residual_out, rms_gamma, rms_eps, weight_bias)   # 1, 4, 11
        quant_out = fp8(norm_out / scale_factor)            # static FP8: 2, 4
        quant_out, scale_out = nvfp4(norm_out, scale_factor)   # NVFP4: 3, 5
        quant_out, scale_out = fp8_per_group(norm_out, block_quant_group_size)  # 8, 9
        quant_out, scale_out = fp8_per_token(norm_out)      # dynamic FP8: 10, 11

    (rounding at each step as in ``fusedcomm.reference.fusion``; bitwise identical on every
    rank). ``input``: ``[N, D]`` float16 / bfloat16 / float32 on the workspace's device,
    ``N * D`` within the workspace's ``max_token_num * hidden_dim``. The workspace's type
    selects the backend (TypeError for any other object). Outputs the pattern writes must be
    given, except ``output`` for pattern 0, which is allocated when None; any output may be an
    input tensor itself (in place). ``quant_out``: float8_e4m3fn of ``input``'s shape;
    ``scale_out`` (10, 11): float32 ``[N, 1]``; (3, 5): E4M3 block scales in the
    ``layout_code`` layout; (8, 9): packed UE8M0 int32 ``(N, K)``, strides ``(1, M)``.
    ``scale_factor`` (2, 4: dequantisation scale; 3, 5: NVFP4 global scale): float or CUDA
    tensor.
    ``use_oneshot=None`` lets the planner choose one-shot or two-shot.

    Returns ``norm_out`` if given, else ``quant_out`` if given, else ``output``. An
    MNNVLAllReduceFusionWorkspace runs patterns 0-5, 10 and 11 (``ops.mnnvl_allreduce``:
    outputs allocated where missing, fp32 sums; quantising patterns return ``quant_out``).
    """
    op = "allreduce_fusion"
    if getattr(workspace, "backend", None) in _BACKEND_CALLS:  # "mnnvl": patterns 0-5, 10, 11
        return _BACKEND_CALLS[workspace.backend](
            op, input, workspace, pattern, launch_with_pdl=launch_with_pdl, output=output,
            residual_out=residual_out, norm_out=norm_out, quant_out=quant_out,
            scale_out=scale_out, residual_in=residual_in, rms_gamma=rms_gamma, rms_eps=rms_eps,
            scale_factor=scale_factor, layout_code=layout_code, use_oneshot=use_oneshot,
            weight_bias=weight_bias,
        )  # fmt: skip
    if type(workspace) is not TRTLLMAllReduceFusionWorkspace and not isinstance(
        workspace, TRTLLMAllReduceFusionWorkspace
    ):
        raise TypeError(
            f"{op}: workspace must come from create_allreduce_fusion_workspace "
            f"(a TRTLLMAllReduceFusionWorkspace or MNNVLAllReduceFusionWorkspace), got "
            f"{type(workspace).__name__}"
        )
    if workspace.destroyed:
        raise ValueError(f"{op}: the workspace has been destroyed")
    pattern = _pattern_arg(op, pattern)
    if pattern in _MOE:
        return moe_unified_call(
            op,
            input,
            workspace,
            pattern,
            launch_with_pdl=launch_with_pdl,
            trigger_completion_at_end=trigger_completion_at_end,
            output=output,
            residual_out=residual_out,
            norm_out=norm_out,
            quant_out=quant_out,
            scale_out=scale_out,
            residual_in=residual_in,
            rms_gamma=rms_gamma,
            rms_eps=rms_eps,
            scale_factor=scale_factor,
            layout_code=layout_code,
            use_oneshot=use_oneshot,
            fp32_acc=fp32_acc,
            moe_reduction_device_num_experts=moe_reduction_device_num_experts,
            moe_reduction_scale_input=moe_reduction_scale_input,
            moe_reduction_active_experts_token_input=moe_reduction_active_experts_token_input,
            moe_reduction_token_input=moe_reduction_token_input,
            expanded_idx_to_permuted_idx=expanded_idx_to_permuted_idx,
            expert_scale_factor=expert_scale_factor,
            shared_expert_output=shared_expert_output,
            block_quant_group_size=block_quant_group_size,
            weight_bias=weight_bias,
        )
    _is_tensor(op, "input", input)
    if input.dim() != 2:
        raise ValueError(
            f"{op}: input must be 2-D [token_num, hidden_dim], got shape {tuple(input.shape)}"
        )
    _elem(op, input.dtype)
    n, d = input.shape
    problems = workspace.check_call(workspace.world_size, n, d, input.dtype)
    if problems:
        raise ValueError(f"{op}: the call does not fit the workspace: " + "; ".join(problems))
    if pattern in _DYNAMIC_FP8:
        if isinstance(quant_out, torch.Tensor) and quant_out.shape != input.shape:
            raise ValueError(
                f"{op}: quant_out shape {tuple(quant_out.shape)} must be the "
                f"input's {tuple(input.shape)}"
            )
        if isinstance(scale_out, torch.Tensor) and tuple(scale_out.shape) != (n, 1):
            raise ValueError(f"{op}: scale_out shape {tuple(scale_out.shape)} must be ({n}, 1)")
    if (
        pattern in _GROUP_FP8
        and isinstance(scale_out, torch.Tensor)
        and isinstance(block_quant_group_size, int)
        and block_quant_group_size > 0
    ):
        packs, rows = -(-(d // block_quant_group_size) // 4), -(-n // 4) * 4
        if tuple(scale_out.shape) != (n, packs) or (
            n > 1 and packs > 1 and tuple(scale_out.stride()) != (1, rows)
        ):
            raise ValueError(
                f"{op}: scale_out must have shape ({n}, {packs}) and strides "
                f"(1, {rows}), got {tuple(scale_out.shape)} / "
                f"{tuple(scale_out.stride())}"
            )
    if pattern == _P.kAllReduce and output is None:
        output = torch.empty_like(input)
    where = (workspace.workspace_tensor, workspace.world_size, workspace.rank, n, d)
    flags = (launch_with_pdl, trigger_completion_at_end, fp32_acc, use_oneshot)
    tensors = (output, residual_in, residual_out, norm_out, quant_out, scale_out, rms_gamma)
    scalars = (rms_eps, scale_factor, layout_code, block_quant_group_size, weight_bias)
    _fused_call(op, pattern, input, where, flags, tensors, scalars)
    if norm_out is not None:
        return norm_out
    if quant_out is not None:
        return quant_out
    return output
