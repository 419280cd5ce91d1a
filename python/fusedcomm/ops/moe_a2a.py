"""MoE all-to-all frontends: initialize, dispatch, combine, sanitize (the free functions).

The workspace is ``uint8 [ep_size, size_per_rank]``: row ``q`` is rank ``q``'s memory, mapped
here at one row stride (:class:`fusedcomm.runtime.peer_memory.PeerMemory`, or any allocation
with that property). Its layout is ``fusedcomm.runtime.moe_a2a_workspace``; the kernels are
``include/fusedcomm/kernels/moe_a2a_*.cuh``.

A round is one dispatch and one combine on every rank of the group, in the same order:

* :func:`moe_a2a_dispatch` sends each local token's payload rows once to every rank that owns
  one of its ``top_k`` experts and returns views of what this rank received, ``[W, R, *]`` per
  payload (row ``[src, j]`` is meaningful for ``j`` below the number of tokens ``src`` sent).
* the caller runs its experts on the received rows and writes, for each received slot, the sum
  of its experts' outputs (router weights applied) into a ``[W, R, H]`` payload;
* :func:`moe_a2a_combine` brings those rows back to the tokens' ranks and sums them per token
  (fp32, in a fixed order: the result depends only on the routing, never on the run).

Every wait for a peer is bounded (``timeout_s``, default ``FUSEDCOMM_TIMEOUT_S``); a rank that
gives up tells its peers, and from then on the workspace is refused on every rank with a
:class:`~fusedcomm.CommFailureError` until :func:`moe_a2a_initialize` runs again on every rank.
Expert ids outside ``[0, num_experts)`` are never followed: the pair is dropped and counted
(:func:`moe_a2a_dropped_expert_ids`; ``check_expert_ids=True`` raises after the call).
Every call is CUDA-graph capturable (no host synchronisation, no host-read counters) unless
``check_expert_ids`` is set.

torch.compile does not trace these functions: while it traces, each one calls itself through
``torch.compiler.disable``, so the compiled region is split around the call, which runs
eagerly between two graphs. Under ``torch.compile(fullgraph=True)`` that split is an error.
(The dispatch returns views of the workspace and every call reads and updates the round's host
state, which the registered-op path of the fusion families does not model.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..runtime.moe_a2a_workspace import (
    MOE_A2A_MAX_PAYLOADS,
    MOE_A2A_MAX_TOP_K,
)
from ..runtime.moe_a2a_workspace import _int as _int
from ._moe_a2a_extensions import (
    COMBINE_DTYPES,
    SF_LAYOUT_LINEAR,
    _active_mask,
    _check_quantised,
    _check_wire,
    _combine_output_dtype,
    _eplb_stats,
    _quantised_output,
    _record,
    _same_round,
    moe_a2a_active_rank_mask,
)
from ._moe_a2a_state import (
    MoeA2ACheckError,
    _max_tokens,
    _module,
    _pdl,
    _pdl_default,
    _Round,
    _state,
    _tensor,
    _Workspace,
)
from ._moe_a2a_state import moe_a2a_initialize as moe_a2a_initialize
from ._register import tracing

__all__ = [
    "MoeA2ACheckError",
    "moe_a2a_active_rank_mask",
    "moe_a2a_combine",
    "moe_a2a_dispatch",
    "moe_a2a_dropped_expert_ids",
    "moe_a2a_eplb_gathered_stats",
    "moe_a2a_initialize",
    "moe_a2a_sanitize_expert_ids",
]

_COMBINE_DTYPES = COMBINE_DTYPES


def _row_is_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape[1:]), reversed(stride[1:]), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _payload_rows(op: str, payloads: Any, local_tokens: int, device: torch.device):
    """Check the payloads; return (tensor, bytes per row, bytes between rows) per payload."""
    if isinstance(payloads, torch.Tensor) or not isinstance(payloads, Sequence):
        raise TypeError(f"{op}: input_payloads must be a list of tensors")
    if not 1 <= len(payloads) <= MOE_A2A_MAX_PAYLOADS:
        raise ValueError(f"{op}: 1 to {MOE_A2A_MAX_PAYLOADS} input payloads, got {len(payloads)}")
    rows = []
    for i, p in enumerate(payloads):
        p = _tensor(op, f"input_payloads[{i}]", p)
        if p.device != device:
            raise ValueError(f"{op}: input_payloads[{i}] is on {p.device}, expected {device}")
        if p.dim() < 2 or p.size(0) != local_tokens:
            raise ValueError(
                f"{op}: input_payloads[{i}] ({tuple(p.shape)}) must be [{local_tokens}, *] "
                "(one row per local token)"
            )
        if not _row_is_contiguous(p.shape, p.stride()):
            raise ValueError(f"{op}: input_payloads[{i}] rows must be contiguous")
        per_row = math.prod(p.shape[1:]) * p.element_size()
        if per_row == 0:
            raise ValueError(f"{op}: input_payloads[{i}] has empty rows {tuple(p.shape)}")
        stride = p.stride(0) * p.element_size() if local_tokens > 1 else per_row
        rows.append((p, per_row, stride))
    return rows


@dataclasses.dataclass(frozen=True)
class _DispatchPlan:
    """What a dispatch of one signature needs beyond the tensors' addresses."""

    rows: tuple[tuple[int, int], ...]  # (bytes between rows, bytes per row) per payload
    views: tuple[torch.Tensor, ...]
    combine_offset: int


def _dispatch_views(st: _Workspace, max_tokens: int, payloads) -> tuple[list[torch.Tensor], int]:
    own = st.workspace[st.rank]
    offsets = st.layout.dispatch_payload_offsets(max_tokens, [b for _, b, _ in payloads])
    views = []
    for (p, nbytes, _), start in zip(payloads, offsets, strict=True):
        size = st.world * max_tokens * nbytes
        views.append(
            own[start : start + size].view(p.dtype).view(st.world, max_tokens, *p.shape[1:])
        )
    combine = st.layout.combine_payload_offset(max_tokens, [b for _, b, _ in payloads])
    return views, combine


def _check_alignment(op: str, st: _Workspace, max_tokens: int, payloads) -> None:
    offsets = st.layout.dispatch_payload_offsets(max_tokens, [b for _, b, _ in payloads])
    for i, ((p, _, _), start) in enumerate(zip(payloads, offsets, strict=True)):
        if start % p.element_size():
            raise ValueError(
                f"{op}: input_payloads[{i}] ({p.dtype}) would start at byte {start} of the row, "
                f"not a multiple of its element size ({p.element_size()}): the payloads lie back "
                "to back, so order them from the largest element size to the smallest"
            )
    end = offsets[-1] + st.world * max_tokens * payloads[-1][1]
    if end > st.row_bytes:
        raise ValueError(
            f"{op}: the workspace row ({st.row_bytes} bytes) cannot hold this round's dispatch "
            f"payloads (they end at byte {end}); runtime_max_tokens_per_rank ({max_tokens}) is "
            "too large for the payload sizes the workspace was sized for"
        )


def moe_a2a_dispatch(
    token_selected_experts: torch.Tensor,
    input_payloads: Sequence[torch.Tensor],
    workspace: torch.Tensor,
    metainfo: torch.Tensor,
    runtime_max_tokens_per_rank: int,
    ep_rank: int,
    ep_size: int,
    top_k: int,
    num_experts: int,
    enable_pdl: bool | None = None,
    *,
    check_expert_ids: bool = False,
    eplb_local_stats: torch.Tensor | None = None,
    enable_rank_mask: bool = False,
    active_rank_mask: Any = None,
    _owner: Any = None,
) -> tuple[list[torch.Tensor], int]:
    """Send every local token's payload rows to the ranks that own its experts.

    ``token_selected_experts``: int32 ``[L, top_k]`` on the workspace's device (``L`` local
    tokens, may be 0; ``top_k`` in [1, 22]). Expert ``e`` of ``num_experts`` (>= ep_size)
    belongs to rank ``e // (base + 1)`` for the first ``E % W`` ranks' experts and ``rem + (e
    - rem * (base + 1)) // base`` after (``base = E // W``, ``rem = E % W``): a contiguous split
    that need not be even. A token goes once to each rank among its experts' owners.
    ``input_payloads``: 1 to 6 tensors ``[L, *]`` of any dtype with contiguous rows; they are
    laid out back to back in the workspace, so each must start at a multiple of its element
    size there (order them from the largest element size to the smallest).
    ``runtime_max_tokens_per_rank`` (``R``): the same on every rank, at least every rank's
    ``L`` and at most the ``max_num_tokens`` of initialisation; a CUDA graph fixes it.

    Returns ``(received, combine_payload_offset)``: ``received[i]`` is a view of this rank's
    row, ``[ep_size, R, *]`` of payload ``i``'s dtype; row ``[src, j]`` holds a token from rank
    ``src`` for ``j`` below the number ``src`` sent here (which slot a token gets is not
    deterministic), other rows hold stale bytes. ``combine_payload_offset``: where the combine
    region starts in the row (pass it to :func:`moe_a2a_combine`). The views stay valid until
    the next dispatch on this workspace.

    Ids outside ``[0, num_experts)`` are dropped and counted; with ``check_expert_ids=True``
    the call synchronises and raises ``ValueError`` when it dropped any (not capturable).
    ``enable_pdl``: programmatic dependent launch (default: on for SM90 and newer).
    ``active_rank_mask``: the ranks of this round (None: every rank), an int or a one-element
    integer tensor (:func:`moe_a2a_active_rank_mask`), bit ``q`` for rank ``q``, this rank's
    included. Ranks outside it are considered gone: tokens routed to their experts are not sent
    (their pairs send nothing and add nothing in the combine; not counted as dropped ids), they
    are neither signalled nor waited for, and nothing they write into this rank's row is read
    (their recv counts read 0; their EPLB rows are stale). Every rank of the round must pass
    the same mask (a rank of the round with another one fails it on every rank) and repeat it
    in the combine; a rank that comes back needs the workspace re-initialised on every rank
    first. ``enable_rank_mask``: accepted for the reference's call form; masks work either way.
    ``eplb_local_stats``: int32 ``[n]``
    (``n`` at most the ``eplb_stats_num_experts`` of initialisation) on the workspace's device;
    every rank's lands in row ``rank`` of every rank's EPLB region during the dispatch
    (:func:`moe_a2a_eplb_gathered_stats`); the return value stays the 2-tuple. The next :func:`moe_a2a_combine` on this workspace must repeat
    this dispatch's local token count, ``top_k``, ``R`` and combine offset.
    """
    if tracing():
        return _dispatch_untraced(
            token_selected_experts,
            input_payloads,
            workspace,
            metainfo,
            runtime_max_tokens_per_rank,
            ep_rank,
            ep_size,
            top_k,
            num_experts,
            enable_pdl,
            check_expert_ids=check_expert_ids,
            eplb_local_stats=eplb_local_stats,
            enable_rank_mask=enable_rank_mask,
            active_rank_mask=active_rank_mask,
            _owner=_owner,
        )
    op = "moe_a2a_dispatch"
    st = _state(op, workspace, ep_rank, metainfo)
    mask = _active_mask(op, st, active_rank_mask)
    eplb_ptr, eplb_count = _eplb_stats(op, st, eplb_local_stats)
    if st.round is not None and st.round.owner is not _owner and st.round.owner is not None:
        raise MoeA2ACheckError(
            f"{op}: a MoeAlltoAll sharing this workspace has dispatched and not combined yet; "
            "its combine must come first (interleaved rounds on one workspace corrupt both)"
        )
    experts = token_selected_experts
    try:
        key = (
            ep_size,
            top_k,
            num_experts,
            runtime_max_tokens_per_rank,
            experts.dtype,
            experts.shape,
            experts.stride(),
            experts.device,
            tuple((p.dtype, p.shape, p.stride(), p.device) for p in input_payloads),
        )
        plan = st.plans.get(key)
    except (AttributeError, TypeError):  # not tensors, or unhashable: the full checks say why
        key, plan = None, None
    if plan is None:
        plan = _plan_dispatch(
            op,
            st,
            experts,
            input_payloads,
            runtime_max_tokens_per_rank,
            ep_size,
            top_k,
            num_experts,
        )
        if key is not None:
            st.plans[key] = plan
    before = int(st.dropped.item()) if check_expert_ids else 0  # synchronises
    flat = []
    for p, (stride, nbytes) in zip(input_payloads, plan.rows, strict=True):
        flat += (p.data_ptr(), stride, nbytes)
    pdl = _pdl_default(st.device) if enable_pdl is None else bool(enable_pdl)
    _module().moe_a2a_dispatch_launch(
        experts,
        _record(st, mask),
        st.dropped.data_ptr(),
        num_experts,
        runtime_max_tokens_per_rank,
        flat,
        eplb_ptr,
        eplb_count,
        pdl,
    )
    st.round = _Round(
        experts.size(0), top_k, runtime_max_tokens_per_rank, plan.combine_offset, _owner, mask
    )
    if check_expert_ids:
        _raise_on_dropped(op, st, before, num_experts)
    return list(plan.views), plan.combine_offset


def moe_a2a_eplb_gathered_stats(workspace: torch.Tensor, ep_rank: int) -> torch.Tensor:
    """The EPLB statistics the last dispatches gathered: int32 ``[ep_size,
    eplb_stats_num_experts]``, a view of this rank's row; row ``q`` holds what rank ``q`` passed
    as ``eplb_local_stats`` (its first entries; the rest keep earlier values, 0 after
    initialisation). Read it between a dispatch and its combine: once this rank has combined,
    a peer's next dispatch may overwrite it."""
    op = "moe_a2a_eplb_gathered_stats"
    st = _state(op, workspace, ep_rank)
    n = st.layout.eplb_stats_num_experts
    if n == 0:
        raise ValueError(f"{op}: the workspace was initialised without an EPLB region")
    start = st.layout.eplb_gathered_stats
    row = st.workspace[st.rank]
    return row[start : start + 4 * st.world * n].view(torch.int32).view(st.world, n)


_dispatch_untraced = torch.compiler.disable(moe_a2a_dispatch)


def _plan_dispatch(
    op: str,
    st: _Workspace,
    experts: Any,
    input_payloads: Any,
    runtime_max_tokens_per_rank: Any,
    ep_size: Any,
    top_k: Any,
    num_experts: Any,
) -> _DispatchPlan:
    """Check a dispatch signature the first time it is seen; return its plan."""
    ep_size = _int(op, "ep_size", ep_size, 1)
    if ep_size != st.world:
        raise ValueError(f"{op}: ep_size ({ep_size}) differs from the workspace's ({st.world})")
    experts = _tensor(op, "token_selected_experts", experts)
    if experts.dtype != torch.int32:
        raise TypeError(f"{op}: token_selected_experts.dtype ({experts.dtype}) must be int32")
    if experts.device != st.workspace.device:
        raise ValueError(
            f"{op}: token_selected_experts is on {experts.device}, the workspace on "
            f"{st.workspace.device}"
        )
    top_k = _int(op, "top_k", top_k, 1, MOE_A2A_MAX_TOP_K)
    if experts.dim() != 2 or experts.size(1) != top_k or not experts.is_contiguous():
        raise ValueError(
            f"{op}: token_selected_experts ({tuple(experts.shape)}, strides {experts.stride()}) "
            f"must be a contiguous [local tokens, top_k={top_k}] tensor"
        )
    _int(op, "num_experts", num_experts, ep_size, 1 << 30)
    max_tokens = _max_tokens(op, st, runtime_max_tokens_per_rank)
    local = experts.size(0)
    if local > max_tokens:
        raise ValueError(
            f"{op}: {local} local tokens exceed runtime_max_tokens_per_rank ({max_tokens})"
        )
    payloads = _payload_rows(op, input_payloads, local, experts.device)
    _check_alignment(op, st, max_tokens, payloads)
    views, combine = _dispatch_views(st, max_tokens, payloads)
    return _DispatchPlan(tuple((s, b) for _, b, s in payloads), tuple(views), combine)


def _raise_on_dropped(op: str, st: _Workspace, before: int, num_experts: int) -> None:
    new = int(st.dropped.item()) - before  # synchronises
    if new:
        raise ValueError(
            f"{op}: {new} (token, k) pairs had expert ids outside [0, {num_experts}); they were "
            "not sent anywhere (the dispatch itself completed on every rank: run the combine)"
        )


def moe_a2a_dropped_expert_ids(workspace: torch.Tensor, ep_rank: int) -> int:
    """How many (token, k) pairs this rank's dispatches dropped since initialisation because
    their expert id lay outside ``[0, num_experts)``. Synchronises the device."""
    st = _state("moe_a2a_dropped_expert_ids", workspace, ep_rank)
    return int(st.dropped.item())


# --- combine ------------------------------------------------------------------------------------


def moe_a2a_combine(
    payload: torch.Tensor,
    local_num_tokens: int,
    workspace: torch.Tensor,
    metainfo: torch.Tensor,
    runtime_max_tokens_per_rank: int,
    ep_rank: int,
    ep_size: int,
    top_k: int,
    combine_payload_offset: int,
    payload_in_workspace: bool = False,
    output_dtype: torch.dtype | None = None,
    output_scales: torch.Tensor | None = None,
    output_scalar_scale: float = 1.0,
    sf_layout: int = SF_LAYOUT_LINEAR,
    output: torch.Tensor | None = None,
    *,
    use_low_precision: bool = False,
    enable_pdl: bool | None = None,
    enable_rank_mask: bool = False,
    active_rank_mask: Any = None,
    _owner: Any = None,
) -> torch.Tensor:
    """Bring the experts' results back to the tokens' ranks and sum them per token.

    ``payload``: ``[ep_size, R, H]`` float16, bfloat16 or float32 (``H`` times the element
    size a multiple of 16 bytes): row ``[src, j]`` is this rank's result for the token in slot
    ``j`` received from ``src`` in the last dispatch, router weights already applied; only
    rows of received tokens are read. With ``payload_in_workspace=True`` it must be the view
    at ``combine_payload_offset`` of the own row (``MoeAlltoAll.
    get_combine_payload_tensor_in_workspace``) and no copy is made; otherwise it must not
    overlap any combine region of the workspace. ``local_num_tokens``, ``R``, ``top_k`` and
    ``combine_payload_offset``: those of the last dispatch on this workspace (checked: a
    combine with other values, or without a dispatch since the last combine, raises
    :class:`MoeA2ACheckError`, a ``ValueError`` and ``RuntimeError``, before any launch).

    Returns ``[local_num_tokens, H]`` (``output`` if given: a contiguous CUDA tensor of exactly
    that shape and the output dtype): for each local token the fp32 sum over its ``top_k``
    pairs of the row its owner sent back (each owner once; a pair that sent nothing counts as
    +0), in a fixed order (a pairwise tree for top_k 2, 4, 6, 8, 10, 16, 22, sequential
    otherwise), rounded once to the payload's dtype. Same routing, same bits, every run. A
    rank with no local tokens still takes part and returns ``[0, H]``.

    ``output_dtype``: None (the payload's dtype) or another of float16, bfloat16, float32: the
    rounded sum is then converted (exact when widening; narrowing from float32 rounds the fp32
    sum once). Quantised outputs (float16 / bfloat16 payloads, ``hidden`` at most 16384), told
    apart as the reference library does, by ``output_dtype`` and ``output_scales.dtype``; each
    quantises the rounded sum (``reference.quant.quantize_nvfp4``, ``reference.moe_a2a.
    quantize_mx``) and writes the scale bytes into ``output_scales`` (a contiguous tensor of
    exactly ``reference.quant.scale_factor_buffer_size(local_num_tokens, hidden / block,
    sf_layout)`` bytes; the swizzled layouts' padding is not written):

    * ``uint8`` + ``float8_e4m3fn`` scales: NVFP4, ``[L, H/2]`` packed E2M1, one E4M3 scale per
      16 values, ``output_scalar_scale`` the global scale ``G`` (it multiplies: typically
      ``448 * 6 / amax``; finite and positive);
    * ``float8_e4m3fn`` + ``uint8`` scales: MXFP8, ``[L, H]`` E4M3, one UE8M0 scale per 32;
    * ``uint8`` + ``uint8`` scales: MXFP4, ``[L, H/2]`` packed E2M1, one UE8M0 scale per 32.

    ``output_scalar_scale`` must be 1.0 for every other output. ``sf_layout``: an ``SfLayout``
    value (0: 128x4 tiles, 1: 8x4 tiles, 2: linear). Every architecture (SM90 included) runs
    them; the bytes are the references' exactly.

    ``use_low_precision=True`` (float16 / bfloat16 payloads, ``hidden`` a multiple of 32, at
    most 16384): the rows travel as MXFP8 (per 32 values one UE8M0 scale, E4M3 codes; 1.03
    bytes per value instead of 2), each term is decoded exactly and summed as above, and the
    result is bfloat16 (or ``output_dtype``'s float dtype, converted). Per term the error is at
    most 2^-4 of the value plus 2^-10 of its block's scale (docs/moe-a2a.md;
    ``reference.moe_a2a.combine_low_precision_reference`` gives the exact bits). Every rank of
    a round must pass the same ``use_low_precision`` (a rank that differs fails the round on
    every rank). Not combined with quantised outputs. ``active_rank_mask``: the dispatch's (as
    in :func:`moe_a2a_dispatch`; another mask raises :class:`MoeA2ACheckError`);
    ``enable_rank_mask`` as there.
    """
    if tracing():
        return _untraced_moe_a2a_combine(
            payload,
            local_num_tokens,
            workspace,
            metainfo,
            runtime_max_tokens_per_rank,
            ep_rank,
            ep_size,
            top_k,
            combine_payload_offset,
            payload_in_workspace,
            output_dtype,
            output_scales,
            output_scalar_scale,
            sf_layout,
            output,
            use_low_precision=use_low_precision,
            enable_pdl=enable_pdl,
            enable_rank_mask=enable_rank_mask,
            active_rank_mask=active_rank_mask,
            _owner=_owner,
        )
    op = "moe_a2a_combine"
    st = _state(op, workspace, ep_rank, metainfo)
    mask = _active_mask(op, st, active_rank_mask)
    spec = _combine_output_dtype(
        op, payload, output_dtype, output_scales, output_scalar_scale, sf_layout, use_low_precision
    )
    out_dtype = spec.dtype
    in_workspace = bool(payload_in_workspace)
    try:
        key = (
            ep_size,
            local_num_tokens,
            runtime_max_tokens_per_rank,
            top_k,
            combine_payload_offset,
            in_workspace,
            payload.dtype,
            payload.shape,
            payload.stride(),
            payload.device,
        )
        checked = key in st.plans
    except (AttributeError, TypeError):  # not a tensor, or unhashable: the checks say why
        key, checked = None, False
    if not checked:
        _check_combine(
            op,
            st,
            payload,
            local_num_tokens,
            runtime_max_tokens_per_rank,
            ep_size,
            top_k,
            combine_payload_offset,
        )
        if key is not None:
            st.plans[key] = True
    _same_round(op, st, local_num_tokens, top_k, runtime_max_tokens_per_rank,
                combine_payload_offset, _owner, mask)  # fmt: skip
    if in_workspace:
        if payload.data_ptr() != st.own_row + combine_payload_offset or not payload.is_contiguous():
            raise MoeA2ACheckError(
                f"{op}: payload_in_workspace=True needs the payload to be the contiguous view at "
                f"combine_payload_offset ({combine_payload_offset}) of this rank's row "
                "(MoeAlltoAll.get_combine_payload_tensor_in_workspace)"
            )
    elif not payload.is_contiguous():
        payload = payload.contiguous()
    hidden = payload.size(2)
    target = None
    if spec.mode is not None:  # the quantised output's checks come before the round's launch
        _check_quantised(op, spec, local_num_tokens, hidden, payload.device)
        target = _quantised_output(op, spec, output, local_num_tokens, hidden, payload.device)
        output = None
    _check_wire(op, spec, hidden)
    summed = torch.bfloat16 if spec.wire else payload.dtype  # what the kernel writes
    converted = out_dtype != summed
    out = _output(op, None if converted else output, local_num_tokens, hidden, payload, summed)
    pdl = _pdl_default(st.device) if enable_pdl is None else bool(enable_pdl)
    _module().moe_a2a_combine_launch(
        out,
        _record(st, mask),
        0 if in_workspace else payload.data_ptr(),
        top_k,
        runtime_max_tokens_per_rank,
        combine_payload_offset,
        spec.wire,
        pdl,
    )
    st.round = None
    if target is not None:
        _module().moe_a2a_quantize_launch(  # bytes: float8 views need no DLPack float8
            out,
            target.view(torch.uint8),
            spec.scales.view(torch.uint8),
            spec.mode,
            spec.layout,
            spec.global_scale,
            pdl,
        )
        return target
    if converted:
        target = _output(op, output, local_num_tokens, hidden, payload, out_dtype)
        return target.copy_(out)
    return out


def _check_combine(
    op: str,
    st: _Workspace,
    payload: Any,
    local_num_tokens: Any,
    runtime_max_tokens_per_rank: Any,
    ep_size: Any,
    top_k: Any,
    combine_payload_offset: Any,
) -> None:
    """Check a combine signature the first time it is seen."""
    ep_size = _int(op, "ep_size", ep_size, 1)
    if ep_size != st.world:
        raise ValueError(f"{op}: ep_size ({ep_size}) differs from the workspace's ({st.world})")
    payload = _tensor(op, "payload", payload)
    if payload.dtype not in _COMBINE_DTYPES:
        raise TypeError(
            f"{op}: payload.dtype ({payload.dtype}) must be float16, bfloat16 or float32"
        )
    max_tokens = _max_tokens(op, st, runtime_max_tokens_per_rank)
    if payload.dim() != 3 or payload.size(0) != ep_size or payload.size(1) != max_tokens:
        raise ValueError(
            f"{op}: payload ({tuple(payload.shape)}) must be [ep_size={ep_size}, "
            f"runtime_max_tokens_per_rank={max_tokens}, hidden]"
        )
    if payload.device != st.workspace.device:
        raise ValueError(
            f"{op}: payload is on {payload.device}, the workspace on {st.workspace.device}"
        )
    _int(op, "local_num_tokens", local_num_tokens, 0, max_tokens)
    _int(op, "top_k", top_k, 1, MOE_A2A_MAX_TOP_K)
    hidden = payload.size(2)
    row_bytes = hidden * payload.element_size()
    if row_bytes == 0 or row_bytes % 16:
        raise ValueError(
            f"{op}: a payload row ({hidden} x {payload.element_size()} bytes) must be a positive "
            "multiple of 16 bytes"
        )
    offset = _int(op, "combine_payload_offset", combine_payload_offset, 0)
    end = offset + ep_size * max_tokens * row_bytes
    if offset < st.layout.payload_data or offset % 16 or end > st.row_bytes:
        raise ValueError(
            f"{op}: the combine region [{offset}, {end}) must lie in the payload data of the "
            f"row [{st.layout.payload_data}, {st.row_bytes}) at a multiple of 16 bytes"
        )


_untraced_moe_a2a_combine = torch.compiler.disable(moe_a2a_combine)


def _output(
    op: str,
    output: Any,
    local: int,
    hidden: int,
    payload: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    dtype = payload.dtype if dtype is None else dtype
    if output is None:
        return torch.empty((local, hidden), dtype=dtype, device=payload.device)
    output = _tensor(op, "output", output)
    if (
        output.shape != (local, hidden)
        or output.dtype != dtype
        or output.device != payload.device
        or not output.is_contiguous()
    ):
        raise ValueError(
            f"{op}: output ({tuple(output.shape)}, {output.dtype}, {output.device}) must be a "
            f"contiguous [{local}, {hidden}] {dtype} tensor on {payload.device}"
        )
    return output


# --- sanitize -----------------------------------------------------------------------------------


def _sanitize_impl(
    expert_ids: torch.Tensor,
    workspace: torch.Tensor,
    ep_rank: int,
    invalid_expert_id: int,
    enable_pdl: bool,
) -> None:
    st = _state("moe_a2a_sanitize_expert_ids", workspace, ep_rank)
    _module().moe_a2a_sanitize_launch(
        expert_ids, st.own_row + st.layout.recv_counters, invalid_expert_id, enable_pdl
    )


def moe_a2a_sanitize_expert_ids(
    expert_ids: torch.Tensor,
    workspace: torch.Tensor,
    metainfo: torch.Tensor,
    ep_rank: int,
    invalid_expert_id: int,
    enable_pdl: bool | None = None,
) -> None:
    """Mark the padding slots of the received expert ids, in place.

    ``expert_ids``: int32 ``[ep_size, R, top_k]``, the received copy of the dispatched
    ``token_selected_experts`` (a view :func:`moe_a2a_dispatch` returned). Every slot ``(src,
    j)`` with ``j`` at or above the number of tokens ``src`` sent in the last dispatch gets
    ``invalid_expert_id`` in all ``top_k`` entries; received slots are left as they are,
    including ids of experts other ranks own (the expert kernels must skip those).
    """
    if tracing():
        return _untraced_moe_a2a_sanitize_expert_ids(
            expert_ids, workspace, metainfo, ep_rank, invalid_expert_id, enable_pdl
        )
    op = "moe_a2a_sanitize_expert_ids"
    st = _state(op, workspace, ep_rank, metainfo)
    ids = _tensor(op, "expert_ids", expert_ids)
    if ids.dtype != torch.int32:
        raise TypeError(f"{op}: expert_ids.dtype ({ids.dtype}) must be int32")
    if ids.dim() != 3 or ids.size(0) != st.world:
        raise ValueError(
            f"{op}: expert_ids ({tuple(ids.shape)}) must be [ep_size={st.world}, R, top_k]"
        )
    if ids.device != st.workspace.device:
        raise ValueError(
            f"{op}: expert_ids is on {ids.device}, the workspace on {st.workspace.device}"
        )
    invalid = _int(op, "invalid_expert_id", invalid_expert_id, -(1 << 31), (1 << 31) - 1)
    _sanitize_impl(ids, workspace, ep_rank, invalid, _pdl(enable_pdl, st.device))


_untraced_moe_a2a_sanitize_expert_ids = torch.compiler.disable(moe_a2a_sanitize_expert_ids)
