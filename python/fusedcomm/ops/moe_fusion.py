"""All-reduce fused with the MoE prologues: reduction (pattern 6) and finalize (pattern 7).

Frontends only: every argument is checked before any launch, then one :class:`MoeFusionCall`
goes to ``_launch_moe`` (through the registered op ``fusedcomm::moe_allreduce_fusion`` while
torch.compile traces). Each rank's prologue rows (``fusedcomm.reference.moe``; on the device
``proto/moe_input.cuh``) are all-reduced one-shot through the workspace's Lamport region (fp32
in rank order, the same bits on every rank), then residual add, RMSNorm and optional NVFP4 run.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import struct
from typing import Any

import torch

from .._checks import bool_arg, contiguous_on, int_arg, real_arg, tensor_arg
from ..enums import MAX_COMM_SIZE, AllReduceFusionPattern, QuantizationSFLayout, pattern_name
from ..reference.quant import scale_factor_buffer_size
from ..runtime.fusion_workspace import check_group_shape
from . import _fusion_launch
from ._fusion_launch import MAX_ROW_BYTES
from ._register import register_op, tracing

__all__ = [
    "MoeFusionCall",
    "moe_unified_call",
    "trtllm_moe_allreduce_fusion",
    "trtllm_moe_finalize_allreduce_fusion",
]

_REDUCTION = AllReduceFusionPattern.kMoEReductionARResidualRMSNorm
_FINALIZE = AllReduceFusionPattern.kMoEFinalizeARResidualRMSNorm
_ACTIVATIONS = (torch.float16, torch.bfloat16)
_LAYOUTS = {0: "SWIZZLED_128x4", 1: "SWIZZLED_8x4", 2: "LINEAR"}


@dataclasses.dataclass(frozen=True, eq=False)
class MoeFusionCall:
    """One checked call of a MoE fusion: the registered op's arguments, in schema order.

    Tensors are contiguous, on the device of ``workspace_ptrs``; activations (float16 or
    bfloat16, ``T``) are rows of ``hidden_dim`` elements; floats are rounded to float32.
    Pattern 6 fills the reduction fields (``num_experts`` >= 1), 7 the finalize ones
    (``top_k`` >= 1), the other pattern's stay None / 0. ``quant_out`` given: NVFP4 of
    ``norm_out`` (global scale ``scale_factor``, scales in the ``layout_code`` layout).
    """

    pattern: int
    workspace_ptrs: torch.Tensor
    world_size: int
    rank: int
    token_num: int
    hidden_dim: int
    launch_with_pdl: bool
    residual_in: torch.Tensor  # [N, D] T
    rms_gamma: torch.Tensor  # [D] T
    norm_out: torch.Tensor  # [N, D] T
    rms_eps: float
    weight_bias: float
    residual_out: torch.Tensor | None = None  # [N, D] T
    allreduce_out: torch.Tensor | None = None  # [N, D] T, pattern 6 only
    quant_out: torch.Tensor | None = None  # N * D / 2 bytes
    scale_out: torch.Tensor | None = None  # scale-factor bytes in the layout
    scale_factor: float = 1.0
    layout_code: int = QuantizationSFLayout.SWIZZLED_128x4
    num_experts: int = 0
    scale_input: torch.Tensor | None = None  # [E, N] float32
    active_experts_token_input: torch.Tensor | None = None  # [E, N, D] T
    token_input: torch.Tensor | None = None  # [N, D] T
    allreduce_in: torch.Tensor | None = None  # [P, D] T
    expanded_idx_to_permuted_idx: torch.Tensor | None = None  # [N, top_k] int32
    expert_scale_factor: torch.Tensor | None = None  # [N, top_k] T
    shared_expert_output: torch.Tensor | None = None  # [N, D] T
    routed_scaling_factor: float = 1.0
    top_k: int = 0


# ------------------------------------------------------------------------------------------
# Argument checks


def _fp32(value: float) -> float:
    """``value`` rounded to the nearest float32 (what the kernels compute with)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _scalar(op: str, name: str, value: Any, default: float) -> float:
    return _fp32(default if value is None else real_arg(op, name, value))


def _activation(op: str, name: str, t: Any, dtype: torch.dtype | None = None) -> torch.dtype:
    tensor_arg(op, name, t)
    if t.dtype not in _ACTIVATIONS:
        raise TypeError(f"{op}: {name}.dtype ({t.dtype}) must be float16 or bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name}.dtype ({t.dtype}) must be the activations' ({dtype})")
    return t.dtype


def _token_rows(op: str, residual_in: Any, dtype=None) -> tuple[torch.dtype, int, int]:
    """(T, N, D) of a 2-D residual_in, the tensor that defines them for the unified API and
    the finalize fusion."""
    dtype = _activation(op, "residual_in", residual_in, dtype)
    if residual_in.dim() != 2:
        raise ValueError(
            f"{op}: residual_in must be 2-D [token_num, hidden_dim], got shape "
            f"{tuple(residual_in.shape)}"
        )
    return dtype, residual_in.shape[0], residual_in.shape[1]


def _operand(op: str, name: str, t: Any, device, dtype, shape: tuple, packed=True) -> None:
    """``t``: contiguous, on ``device``, of ``dtype``, ``prod(shape)`` elements (exactly
    ``shape`` when it has that many dimensions); ``packed``: read in 16-byte packs, so
    16-byte aligned."""
    contiguous_on(op, name, t, device)
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name}.dtype ({t.dtype}) must be {dtype}")
    numel = math.prod(shape)
    if t.numel() != numel or (t.dim() == len(shape) and tuple(t.shape) != shape):
        raise ValueError(
            f"{op}: {name} must be {list(shape)} ({numel} elements), got shape {tuple(t.shape)}"
        )
    if packed and not tracing() and t.data_ptr() % 16:  # (fake tensors have no address)
        raise ValueError(f"{op}: {name} must be 16-byte aligned (data_ptr {t.data_ptr():#x})")


def _where(op: str, dtype, device, workspace_ptrs, world_size, rank, token_num, hidden_dim):
    """The group, the row shape and the pointer table of one call."""
    names = ("world_size", "world_rank", "token_num")
    check_group_shape(op, names, world_size, rank, token_num, hidden_dim, 0)
    elem = dtype.itemsize
    if hidden_dim * elem % 16:
        raise ValueError(
            f"{op}: hidden_dim ({hidden_dim}) must be a multiple of {16 // elem} for {dtype}"
        )
    if hidden_dim * elem > MAX_ROW_BYTES:
        raise ValueError(
            f"{op}: hidden_dim ({hidden_dim}) must be <= {MAX_ROW_BYTES // elem} for {dtype}"
        )
    ptrs = contiguous_on(op, "workspace_ptrs", workspace_ptrs, device)
    if ptrs.dtype != torch.int64 or ptrs.numel() != 3 * world_size + 1:
        raise ValueError(
            f"{op}: workspace_ptrs must be the int64 pointer table of "
            f"3 * world_size + 1 = {3 * world_size + 1} entries, got "
            f"{ptrs.dtype} with {ptrs.numel()}"
        )
    need = token_num * hidden_dim * elem * world_size
    if need > MAX_COMM_SIZE:
        raise ValueError(
            f"{op}: the call does not fit the workspace: token_num * hidden_dim * {elem} * "
            f"world_size ({token_num} * {hidden_dim} * {elem} * {world_size} = {need} bytes) "
            f"exceeds MAX_COMM_SIZE ({MAX_COMM_SIZE}), the largest Lamport segment"
        )


def _outputs(op, device, dtype, n, d, rows, quant) -> tuple:
    """Checks the outputs; ``rows``: ((name, tensor or None), ...) of the [N, D] outputs,
    norm_out first; ``quant``: (quant_out, scale_out, scale_factor, layout_code). Returns
    (quant_out, scale_out, scale_factor as fp32, layout code)."""
    quant_out, scale_out, scale_factor, layout_code = quant
    if all(t is None for _, t in rows) and quant_out is None:
        names = ", ".join(name for name, _ in rows)
        raise ValueError(f"{op}: needs at least one output ({names}, quant_out)")
    if rows[0][1] is None:
        raise ValueError(f"{op}: norm_out is required (the RMSNorm result is always written)")
    for name, t in rows:
        if t is not None:
            _operand(op, name, t, device, dtype, (n, d))
    layout = QuantizationSFLayout.SWIZZLED_128x4 if layout_code is None else layout_code
    if isinstance(layout, bool) or not isinstance(layout, int) or layout not in _LAYOUTS:
        raise ValueError(
            f"{op}: layout_code ({layout_code!r}) must be a QuantizationSFLayout "
            "value (0, 1, 2) or None"
        )
    quant = (quant_out, scale_out, _scalar(op, "scale_factor", scale_factor, 1.0), layout)
    if quant_out is None:
        if scale_out is not None:
            raise ValueError(f"{op}: scale_out is given without quant_out (NVFP4 needs both)")
        return quant
    if d % 16:
        raise ValueError(f"{op}: NVFP4 (quant_out) needs hidden_dim ({d}) to be a multiple of 16")
    contiguous_on(op, "quant_out", quant_out, device)
    have = quant_out.numel() * quant_out.element_size()
    if have != n * d // 2:
        raise ValueError(
            f"{op}: quant_out must hold {n * d // 2} bytes (two FP4 values per byte), got {have}"
        )
    if scale_out is None:
        raise ValueError(f"{op}: NVFP4 (quant_out) needs scale_out")
    contiguous_on(op, "scale_out", scale_out, device)
    need = scale_factor_buffer_size(n, d // 16, layout)
    have = scale_out.numel() * scale_out.element_size()
    if have < need:
        raise ValueError(
            f"{op}: scale_out holds {have} bytes; {_LAYOUTS[layout]} needs {need} for "
            f"{n} rows of {d // 16} scale factors"
        )
    return quant


def _check_indices(op: str, idx: torch.Tensor, rows: int) -> None:
    """Every entry of ``idx`` is -1 or a row below ``rows`` (reads ``idx`` on the host)."""
    host = idx.cpu()
    bad = (host < -1) | (host >= rows)
    if bool(bad.any()):
        t, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{op}: expanded_idx_to_permuted_idx[{t}, {k}] ({int(host[t, k])}) must be -1 or "
            f"a row of allreduce_in (0..{rows - 1})"
        )


# ------------------------------------------------------------------------------------------
# Normalising one call (every check, no launch)


def _head(op: str, pattern: int, where: tuple, dtype, pdl, norm: tuple, rows, quant) -> tuple:
    """Checks and returns the fields both patterns share (MoeFusionCall up to layout_code);
    ``where``: (workspace_ptrs, world_size, rank, token_num, hidden_dim), ``norm``: (residual_in,
    rms_gamma, its name, rms_eps, its name, weight_bias), ``rows``, ``quant``: see _outputs."""
    workspace_ptrs, world_size, rank, n, d = where
    residual_in, rms_gamma, gamma_name, rms_eps, eps_name, weight_bias = norm
    device = residual_in.device
    _where(op, dtype, device, workspace_ptrs, world_size, rank, n, d)
    _operand(op, "residual_in", residual_in, device, dtype, (n, d))
    _operand(op, gamma_name, rms_gamma, device, dtype, (d,))
    quant = _outputs(op, device, dtype, n, d, rows, quant)
    norm_out, residual_out, *allreduce_out = (t for _, t in rows)
    return (
        (pattern, workspace_ptrs, world_size, rank, n, d, bool_arg(op, "launch_with_pdl", pdl))
        + (residual_in, rms_gamma, norm_out, _scalar(op, eps_name, rms_eps, 0.0))
        + (_scalar(op, "weight_bias", weight_bias, 0.0), residual_out, *(allreduce_out or [None]))
        + quant
    )


def _reduction_call(op: str, where: tuple, norm: tuple, moe: tuple, outputs: tuple, quant, pdl):
    """Pattern 6's MoeFusionCall. ``moe``: (num_experts, scale_input,
    active_experts_token_input, token_input); ``outputs``: (norm_out, residual_out,
    moe_allreduce_out); the rest as in :func:`_head`."""
    _, _, _, n, d = where
    dtype = _activation(op, "residual_in", norm[0])
    rows = tuple(zip(("norm_out", "residual_out", "moe_allreduce_out"), outputs))
    head = _head(op, _REDUCTION, where, dtype, pdl, norm, rows, quant)
    num_experts, scale_input, experts, token_input = moe
    e = int_arg(op, "moe_reduction_device_num_experts", num_experts, 1)
    device = norm[0].device
    _operand(op, "moe_reduction_active_experts_token_input", experts, device, dtype, (e, n, d))
    _operand(op, "moe_reduction_scale_input", scale_input, device, torch.float32, (e, n), False)
    _operand(op, "moe_reduction_token_input", token_input, device, dtype, (n, d))
    return MoeFusionCall(*head, e, scale_input, experts, token_input)


def _finalize_call(op, where, allreduce_in, norm, moe, outputs, quant, pdl, check_indices):
    """Pattern 7's MoeFusionCall. ``where``: (workspace_ptrs, world_size, rank); ``moe``:
    (expanded_idx_to_permuted_idx, expert_scale_factor, shared_expert_output,
    routed_scaling_factor); ``outputs``: (norm_out, residual_out); the rest as in
    :func:`_head`."""
    residual_in = norm[0]
    dtype, n, d = _token_rows(op, residual_in, _activation(op, "allreduce_in", allreduce_in))
    rows = tuple(zip(("norm_out", "residual_out"), outputs))
    head = _head(op, _FINALIZE, where + (n, d), dtype, pdl, norm, rows, quant)
    device = residual_in.device
    if allreduce_in.dim() < 1 or allreduce_in.shape[-1] != d:
        raise ValueError(
            f"{op}: allreduce_in must be [P, hidden_dim] rows (last dimension {d}), got shape "
            f"{tuple(allreduce_in.shape)}"
        )
    permuted_rows = allreduce_in.numel() // d
    _operand(op, "allreduce_in", allreduce_in, device, dtype, (permuted_rows, d))
    idx, expert_scale, shared, routed_scaling = moe
    tensor_arg(op, "expanded_idx_to_permuted_idx", idx)
    if idx.dim() != 2 or idx.shape[0] != n or idx.shape[1] < 1:
        raise ValueError(
            f"{op}: expanded_idx_to_permuted_idx must be [token_num, top_k] = [{n}, top_k >= 1],"
            f" got shape {tuple(idx.shape)}"
        )
    top_k = idx.shape[1]
    _operand(op, "expanded_idx_to_permuted_idx", idx, device, torch.int32, (n, top_k), False)
    if expert_scale is not None:
        _operand(op, "expert_scale_factor", expert_scale, device, dtype, (n, top_k), False)
    if shared is not None:
        _operand(op, "shared_expert_output", shared, device, dtype, (n, d))
    rsf = _scalar(op, "routed_scaling_factor", routed_scaling, 1.0)
    if bool_arg(op, "check_indices", check_indices):
        _check_indices(op, idx, permuted_rows)
    tail = (allreduce_in, idx, expert_scale, shared, rsf, top_k)
    return MoeFusionCall(*head, 0, None, None, None, *tail)


# ------------------------------------------------------------------------------------------
# The registered op and the launch


def _launch_moe(call: MoeFusionCall) -> None:
    """Run one MoE fusion on the current stream (the kernel side's ``launch_moe``)."""
    _fusion_launch.launch_moe(call)


def _moe_impl(*args) -> None:
    """The op's implementation; ``args`` in schema order (MoeFusionCall's field order)."""
    call = MoeFusionCall(*args)
    if call.token_num:
        _launch_moe(call)


_moe_op = register_op(
    "moe_allreduce_fusion(int pattern, Tensor workspace_ptrs, int world_size, int world_rank, "
    "int token_num, int hidden_dim, bool launch_with_pdl, Tensor residual_in, "
    "Tensor rms_gamma, Tensor(a!) norm_out, float rms_eps, float weight_bias, "
    "Tensor(b!)? residual_out, Tensor(c!)? allreduce_out, Tensor(d!)? quant_out, "
    "Tensor(e!)? scale_out, float scale_factor, int layout_code, int num_experts, "
    "Tensor? scale_input, Tensor? active_experts_token_input, Tensor? token_input, "
    "Tensor? allreduce_in, Tensor? expanded_idx_to_permuted_idx, "
    "Tensor? expert_scale_factor, Tensor? shared_expert_output, "
    "float routed_scaling_factor, int top_k) -> ()",
    _moe_impl,
    lambda *args: None,  # the fake: nothing to allocate, every output is given
)


def _run(call: MoeFusionCall) -> None:
    args = tuple(getattr(call, f.name) for f in dataclasses.fields(call))
    if tracing():
        _moe_op(*args)
    else:
        _moe_impl(*args)


# ------------------------------------------------------------------------------------------
# Public entry points


def trtllm_moe_allreduce_fusion(
    world_size, world_rank, token_num, hidden_dim, workspace_ptrs, launch_with_pdl,
    residual_in, rms_gamma, rms_eps, scale_factor, moe_reduction_device_num_experts,
    moe_reduction_scale_input, moe_reduction_active_experts_token_input,
    moe_reduction_token_input, layout_code, moe_allreduce_out, residual_out, norm_out,
    quant_out, scale_out, weight_bias=None,
) -> None:  # fmt: skip
    """MoE reduction (pattern 6): each rank's scaled expert sum, all-reduced, then the norm.

    Unfused equivalent (``rd``: round to the activation dtype ``T``; per token)::

        a = 0; for e in experts: a = rd(a + rd(x[e] * s[e]))      # x, s: the expert inputs
        a = rd(a + moe_reduction_token_input)
        moe_allreduce_out = sum over ranks q (in rank order) of a_q   # fp32, one rd
        residual_out = rd(moe_allreduce_out + residual_in)
        norm_out = rms_norm(residual_out, rms_gamma, rms_eps, weight_bias)
        quant_out, scale_out = nvfp4(norm_out, scale_factor)       # when quant_out is given

    (every rounding in ``fusedcomm.reference.moe``; the same bits on every rank). ``T`` is
    float16 or bfloat16; ``residual_in``, ``moe_reduction_token_input`` and the outputs
    hold ``N * D`` elements (``N = token_num``, ``D = hidden_dim``); ``x`` =
    ``moe_reduction_active_experts_token_input`` is ``[E, N, D]``, ``s`` =
    ``moe_reduction_scale_input`` ``[E, N]`` float32 (``E =
    moe_reduction_device_num_experts``); ``rms_gamma``: ``[D]``. ``norm_out`` is required.
    NVFP4 needs ``quant_out`` (``N * D / 2`` bytes) and ``scale_out``
    (``scale_factor_buffer_size(N, D / 16, layout_code)`` bytes or more); ``scale_factor``
    is its global scale (float; None is 1.0), ``layout_code=None`` SWIZZLED_128x4. Always
    one-shot: ``N * D * 2 * world_size`` bytes must fit a Lamport segment. ``rms_eps`` and
    ``weight_bias`` None are 0.
    """
    op = "trtllm_moe_allreduce_fusion"
    norm = (residual_in, rms_gamma, "rms_gamma", rms_eps, "rms_eps", weight_bias)
    moe = (
        moe_reduction_device_num_experts,
        moe_reduction_scale_input,
        moe_reduction_active_experts_token_input,
        moe_reduction_token_input,
    )
    where = (workspace_ptrs, world_size, world_rank, token_num, hidden_dim)
    outputs = (norm_out, residual_out, moe_allreduce_out)
    quant = (quant_out, scale_out, scale_factor, layout_code)
    _run(_reduction_call(op, where, norm, moe, outputs, quant, launch_with_pdl))


def trtllm_moe_finalize_allreduce_fusion(
    allreduce_in, residual_in, norm_weight, expanded_idx_to_permuted_idx, norm_out,
    residual_out, quant_out, scale_out, workspace_ptrs, launch_with_pdl, world_rank,
    world_size, eps, shared_expert_output, expert_scale_factor, routed_scaling_factor,
    weight_bias=None, *, scale_factor=1.0, layout_code=None, check_indices: bool = False,
) -> None:  # fmt: skip
    """MoE finalize (pattern 7): gather each token's expert rows, all-reduce, then the norm.

    Unfused equivalent (``rd``: round to the activation dtype ``T``; per token ``t``)::

        a = 0
        for k with p = expanded_idx_to_permuted_idx[t, k] != -1:   # in order; -1 = skip
            a = rd(a + rd(allreduce_in[p] * expert_scale_factor[t, k]))  # or rd(a + row p)
        a = rd(a * routed_scaling_factor)                        # when given and != 1
        a = rd(a + shared_expert_output[t])                      # when given
        residual_out = rd(sum over ranks q (in rank order) of a_q + residual_in)  # fp32 sum
        norm_out = rms_norm(residual_out, norm_weight, eps, weight_bias)
        quant_out, scale_out = nvfp4(norm_out, scale_factor)     # when quant_out is given

    (every rounding in ``fusedcomm.reference.moe``; the same bits on every rank).
    ``allreduce_in``: ``[P, D]`` rows (any shape with last dimension ``D``) of float16 or
    bfloat16 ``T``; ``residual_in``: ``[N, D]`` (defines ``N`` and ``D``); the index table
    ``[N, top_k]`` int32; ``expert_scale_factor``: ``[N, top_k]`` of ``T`` or None;
    ``shared_expert_output``: ``[N, D]`` or None; ``routed_scaling_factor`` None is 1.0;
    ``norm_out`` is required. Keyword-only: ``scale_factor`` (NVFP4 global scale),
    ``layout_code`` (None is SWIZZLED_128x4), ``check_indices``. Each index must be -1 or a
    row of ``allreduce_in``: the caller's contract (the device skips negative entries and
    does not bounds-check the others); ``check_indices=True`` reads the table on the host
    (synchronises) and raises ValueError for a bad entry.
    """
    op = "trtllm_moe_finalize_allreduce_fusion"
    norm = (residual_in, norm_weight, "norm_weight", eps, "eps", weight_bias)
    idx = expanded_idx_to_permuted_idx
    moe = (idx, expert_scale_factor, shared_expert_output, routed_scaling_factor)
    where = (workspace_ptrs, world_size, world_rank)
    outputs = (norm_out, residual_out)
    quant = (quant_out, scale_out, scale_factor, layout_code)
    call = _finalize_call(
        op, where, allreduce_in, norm, moe, outputs, quant, launch_with_pdl, check_indices
    )
    _run(call)


_MOE_INPUTS = tuple(
    "moe_reduction_" + name
    for name in ("device_num_experts", "scale_input", "active_experts_token_input", "token_input")
)
_UNIFIED_NEEDS = {  # what each pattern needs, in the order the missing one is reported
    _REDUCTION: _MOE_INPUTS + ("residual_in", "rms_gamma"),
    _FINALIZE: ("expanded_idx_to_permuted_idx", "residual_in", "rms_gamma"),
}


def moe_unified_call(
    op: str, input, workspace, pattern: int, *, launch_with_pdl=False,
    trigger_completion_at_end=True, output=None, residual_out=None, norm_out=None,
    quant_out=None, scale_out=None, residual_in=None, rms_gamma=None, rms_eps=1e-6,
    scale_factor=None, layout_code=None, use_oneshot=None, fp32_acc=False,
    moe_reduction_device_num_experts=None, moe_reduction_scale_input=None,
    moe_reduction_active_experts_token_input=None, moe_reduction_token_input=None,
    expanded_idx_to_permuted_idx=None, expert_scale_factor=None, shared_expert_output=None,
    block_quant_group_size=None, weight_bias=0.0, check_indices: bool = False,
) -> torch.Tensor:  # fmt: skip
    """``allreduce_fusion`` for patterns 6 and 7 (the caller checked the workspace).

    Pattern 6: needs the four ``moe_reduction_*`` arguments, ``residual_in`` (``[N, D]``,
    defines both) and ``rms_gamma``; ``output`` is ``moe_allreduce_out``; ``input`` is not
    read. Returns the first of ``norm_out, quant_out, residual_out, output, residual_in``
    that is not None. Pattern 7: ``input`` is ``allreduce_in``; needs
    ``expanded_idx_to_permuted_idx``, ``residual_in`` and ``rms_gamma``; allocates
    ``norm_out`` / ``residual_out`` when None; no routed scaling; ``output`` is not used;
    returns ``norm_out``. For both, a ``scale_factor`` that is not a number (a tensor, None)
    is 1.0; ``use_oneshot``, ``fp32_acc``, ``trigger_completion_at_end`` and
    ``block_quant_group_size`` change nothing (always one-shot); a call that does not fit
    the workspace raises ValueError.
    """
    given = {  # explicit (not locals()): torch.compile traces this function
        "moe_reduction_device_num_experts": moe_reduction_device_num_experts,
        "moe_reduction_scale_input": moe_reduction_scale_input,
        "moe_reduction_active_experts_token_input": moe_reduction_active_experts_token_input,
        "moe_reduction_token_input": moe_reduction_token_input,
        "expanded_idx_to_permuted_idx": expanded_idx_to_permuted_idx,
        "residual_in": residual_in,
        "rms_gamma": rms_gamma,
    }
    if pattern not in _UNIFIED_NEEDS:
        raise ValueError(f"{op}: {pattern_name(pattern)} is not a MoE fusion (6 or 7)")
    for name in _UNIFIED_NEEDS[pattern]:
        if given[name] is None:
            raise ValueError(f"{op}: {pattern_name(pattern)} needs {name}")
    bool_arg(op, "trigger_completion_at_end", trigger_completion_at_end)
    bool_arg(op, "fp32_acc", fp32_acc)
    if use_oneshot is not None:
        bool_arg(op, "use_oneshot", use_oneshot)
    if isinstance(scale_factor, bool) or not isinstance(scale_factor, numbers.Real):
        scale_factor = 1.0
    dtype, n, d = _token_rows(op, residual_in)
    where = (workspace.workspace_tensor, workspace.world_size, workspace.rank)
    norm = (residual_in, rms_gamma, "rms_gamma", rms_eps, "rms_eps", weight_bias)
    quant = (quant_out, scale_out, scale_factor, layout_code)
    if pattern == _REDUCTION:
        tensor_arg(op, "input", input)  # not read: the MoE inputs are the all-reduced data
        moe = tuple(given[name] for name in _MOE_INPUTS)
        outputs = (norm_out, residual_out, output)
        call = _reduction_call(op, where + (n, d), norm, moe, outputs, quant, launch_with_pdl)
    else:
        _activation(op, "input", input, dtype)  # allreduce_in: the permuted expert rows
        norm_out = torch.empty_like(residual_in) if norm_out is None else norm_out
        residual_out = torch.empty_like(residual_in) if residual_out is None else residual_out
        moe = (expanded_idx_to_permuted_idx, expert_scale_factor, shared_expert_output, None)
        outputs = (norm_out, residual_out)
        call = _finalize_call(
            op, where, input, norm, moe, outputs, quant, launch_with_pdl, check_indices
        )
    problems = workspace.check_call(workspace.world_size, n, d, dtype, use_oneshot=True)
    if problems:
        raise ValueError(f"{op}: the call does not fit the workspace: " + "; ".join(problems))
    _run(call)
    candidates = (norm_out,) if pattern == _FINALIZE else (norm_out, quant_out, residual_out)
    return next(t for t in (*candidates, output, residual_in) if t is not None)
