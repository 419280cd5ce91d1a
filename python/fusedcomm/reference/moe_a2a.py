"""References for the MoE all-to-all (dispatch, combine, sanitize): plain torch, any device.

Every function simulates the whole EP group at once: arguments and results are lists indexed
by rank (``W`` = the list's length = ep_size), so no process group is needed.

Expert ``e`` of ``E`` belongs to rank :func:`expert_owner` (contiguous ceil/floor split).
Dispatch sends each token's payload rows once to every rank that owns one of its ``top_k``
experts; combine sums, for each token, the rows its owners send back; sanitize marks the
padding slots of the received expert ids.

Slot order. The dispatch kernels take a slot in the destination with an atomic increment, so
which slot ``j`` a token gets among those from the same source differs from run to run. The
reference assigns slots in a canonical order (ascending token index) instead. Compare the
received payloads as a multiset per source (:func:`received_rows` sorts them); the target
ranks, the counts and the set of valid ``(t, k)`` pairs are deterministic and compare with
``torch.equal``; the send indices are a permutation of ``0 .. count - 1`` per (source,
destination). Combine is deterministic given the send indices: its summation tree is fixed
(:func:`combine_sum_steps`), so the kernel's output compares with ``torch.equal``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "COMBINE_PAIRWISE_TOP_K",
    "DispatchReference",
    "combine_low_precision_reference",
    "combine_reference",
    "combine_sum",
    "combine_sum_steps",
    "dequantize_mx",
    "dispatch_reference",
    "expert_owner",
    "quantize_mx",
    "received_rows",
    "sanitize_reference",
]

MAX_TOP_K = 22
MAX_EP_SIZE = 64
# top_k values whose combine sum is a pairwise tree; every other top_k sums sequentially.
COMBINE_PAIRWISE_TOP_K = (2, 4, 6, 8, 10, 16, 22)
_COMBINE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _ids(op: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{op}: {name}.dtype ({t.dtype}) must be an integer type")
    return t


def _ep_size(op: str, n: int) -> int:
    if not 1 <= n <= MAX_EP_SIZE:
        raise ValueError(f"{op}: the number of ranks ({n}) must be in [1, {MAX_EP_SIZE}]")
    return n


def expert_owner(expert_ids: torch.Tensor, num_experts: int, ep_size: int) -> torch.Tensor:
    """The rank owning each expert id, or -1 for an id outside ``[0, num_experts)``.

    Contiguous ceil/floor split: with ``base = E // W`` and ``rem = E % W``, ranks
    ``0 .. rem-1`` own ``base + 1`` experts each and the others ``base``::

        owner(e) = e // (base + 1)                          if e < rem * (base + 1)
                   rem + (e - rem * (base + 1)) // base     otherwise

    (``e // base`` when ``W`` divides ``E``). ``expert_ids``: any integer tensor; returns an
    int32 tensor of the same shape. Requires ``1 <= ep_size <= num_experts``.
    """
    op = "expert_owner"
    _ids(op, "expert_ids", expert_ids)
    if ep_size < 1 or num_experts < ep_size:
        raise ValueError(f"{op}: need 1 <= ep_size ({ep_size}) <= num_experts ({num_experts})")
    base, rem = divmod(num_experts, ep_size)
    split = rem * (base + 1)
    e = expert_ids.to(torch.int64)
    owner = torch.where(e < split, e // (base + 1), rem + (e - split) // base)
    valid = (e >= 0) & (e < num_experts)
    return torch.where(valid, owner, torch.full_like(owner, -1)).to(torch.int32)


@dataclass(frozen=True)
class DispatchReference:
    """What a dispatch round leaves on every rank (lists indexed by rank).

    - ``recv[q][i]``: payload ``i`` as received by rank ``q``, ``[W, R, *]`` of the payload's
      dtype; row ``[src, j]`` is meaningful for ``j < recv_counts[q][src]`` (the reference
      fills the rest with zeros; the kernels leave stale bytes there).
    - ``recv_counts[q]``: int32 ``[W]``, tokens rank ``q`` received from each source.
    - ``target_ranks[r]``, ``send_indices[r]``: int32 ``[L_r, top_k]`` of sending rank ``r``:
      for the first ``k`` of token ``t`` that targets a rank, that rank and the slot the token
      took there; ``(-1, -1)`` for a later ``k`` with the same destination and for an expert
      id outside ``[0, num_experts)``.
    - ``dropped[r]``: how many ``(t, k)`` pairs of rank ``r`` had an id outside
      ``[0, num_experts)`` (not routed; the kernels count them in a device counter).
    """

    recv: list[list[torch.Tensor]]
    recv_counts: list[torch.Tensor]
    target_ranks: list[torch.Tensor]
    send_indices: list[torch.Tensor]
    dropped: list[int]


def _routes(owner: torch.Tensor) -> torch.Tensor:
    """Mask of the ``(t, k)`` pairs that send: valid and the first ``k`` to their rank."""
    top_k = owner.shape[1]
    same = owner.unsqueeze(2) == owner.unsqueeze(1)  # [L, k, k']
    earlier = torch.ones(top_k, top_k, dtype=torch.bool, device=owner.device).tril(-1)
    repeated = (same & earlier).any(dim=2)
    return (owner >= 0) & ~repeated


def dispatch_reference(
    token_selected_experts: Sequence[torch.Tensor],
    payloads: Sequence[Sequence[torch.Tensor]],
    num_experts: int,
    runtime_max_tokens_per_rank: int,
) -> DispatchReference:
    """Dispatch of every rank at once, with slots in canonical order.

    Unfused equivalent, for each sending rank ``r`` (``recv_counts`` start at 0)::

        for t in 0 .. L_r-1:                        # ascending: the canonical slot order
            seen = {}
            for k in 0 .. top_k-1:
                e = token_selected_experts[r][t, k]
                if not 0 <= e < E:                  # not routed, counted
                    dropped[r] += 1; (rank, idx)[t, k] = (-1, -1)
                elif owner(e) in seen:              # this token already goes there
                    (rank, idx)[t, k] = (-1, -1)
                else:
                    d = owner(e); seen.add(d)
                    j = recv_counts[d][r]; recv_counts[d][r] += 1
                    (rank, idx)[t, k] = (d, j)
                    for i: recv[d][i][r, j] = payloads[r][i][t]

    ``token_selected_experts[r]``: ``[L_r, top_k]`` integer (int32 in the op), ``L_r`` may be
    0, ``top_k`` in [1, 22] and equal on every rank; ``payloads[r]``: the same number of
    tensors on every rank, payload ``i`` ``[L_r, *]`` with the same trailing shape and dtype on
    every rank (any dtype); ``runtime_max_tokens_per_rank`` (``R``) >= every ``L_r``.
    The kernels fill slots in atomic (nondeterministic) order; see the module docstring for
    how to compare.
    """
    op = "dispatch_reference"
    w = _ep_size(op, len(token_selected_experts))
    if len(payloads) != w:
        raise ValueError(f"{op}: payloads has {len(payloads)} ranks, expected {w}")
    r_max = runtime_max_tokens_per_rank
    if r_max < 1:
        raise ValueError(f"{op}: runtime_max_tokens_per_rank ({r_max}) must be >= 1")
    experts = [
        _ids(op, f"token_selected_experts[{r}]", e) for r, e in enumerate(token_selected_experts)
    ]
    if any(e.dim() != 2 for e in experts):
        raise ValueError(f"{op}: token_selected_experts must be [L, top_k] on every rank")
    top_k = experts[0].shape[1]
    if not 1 <= top_k <= MAX_TOP_K or any(e.shape[1] != top_k for e in experts):
        shapes = [tuple(e.shape) for e in experts]
        raise ValueError(
            f"{op}: top_k must be in [1, {MAX_TOP_K}] and equal on all ranks: {shapes}"
        )
    n_payloads = len(payloads[0])
    for r in range(w):
        if experts[r].shape[0] > r_max:
            raise ValueError(
                f"{op}: rank {r} has {experts[r].shape[0]} tokens, more than "
                f"runtime_max_tokens_per_rank ({r_max})"
            )
        if len(payloads[r]) != n_payloads:
            raise ValueError(f"{op}: rank {r} has {len(payloads[r])} payloads, rank 0 {n_payloads}")
        for i, p in enumerate(payloads[r]):
            ref = payloads[0][i]
            if (
                p.shape[0] != experts[r].shape[0]
                or p.shape[1:] != ref.shape[1:]
                or p.dtype != ref.dtype
            ):
                raise ValueError(
                    f"{op}: payloads[{r}][{i}] ({tuple(p.shape)}, {p.dtype}) must be "
                    f"[{experts[r].shape[0]}, *{tuple(ref.shape[1:])}] of {ref.dtype}"
                )

    recv = [[p.new_zeros((w, r_max, *p.shape[1:])) for p in payloads[0]] for _ in range(w)]
    device = experts[0].device
    recv_counts = [torch.zeros(w, dtype=torch.int32, device=device) for _ in range(w)]
    target_ranks, send_indices, dropped = [], [], []
    for r in range(w):
        owner = expert_owner(experts[r], num_experts, w)
        sends = _routes(owner)
        ranks = torch.where(sends, owner, torch.full_like(owner, -1))
        slots = torch.full_like(owner, -1)
        for d in range(w):
            to_d = sends & (owner == d)  # at most one k per token
            tokens = to_d.any(dim=1).nonzero().flatten()
            count = tokens.numel()
            slots[to_d] = torch.arange(count, dtype=torch.int32, device=device)
            recv_counts[d][r] = count
            for i, p in enumerate(payloads[r]):
                recv[d][i][r, :count] = p[tokens]
        target_ranks.append(ranks)
        send_indices.append(slots)
        dropped.append(int((owner < 0).sum()))
    return DispatchReference(recv, recv_counts, target_ranks, send_indices, dropped)


def _sort_key(rows: Sequence[torch.Tensor], j: int) -> bytes:
    return b"".join(
        r[j].contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes() for r in rows
    )


def received_rows(recv, recv_counts: torch.Tensor):
    """The meaningful received rows of one rank, per source, in a canonical (sorted) order.

    ``recv``: one received payload ``[W, R, *]`` or a list of them (all payloads of the rank);
    ``recv_counts``: that rank's ``[W]`` counts. Rows ``j < recv_counts[src]`` are kept and
    sorted by their bytes (with a list, by the bytes of all payloads of the slot together, so
    the payloads of one token stay aligned). Returns, per source, a tensor ``[n_src, *]``, or
    with a list a list of such tensors. Two results compare equal with ``torch.equal`` iff the
    ranks received the same multiset of tokens from each source, whatever the slot order.
    """
    single = isinstance(recv, torch.Tensor)
    payloads = [recv] if single else list(recv)
    out = []
    for src in range(len(recv_counts)):
        n = int(recv_counts[src])
        rows = [p[src, :n] for p in payloads]
        order = sorted(range(n), key=lambda j: _sort_key(rows, j))
        index = torch.tensor(order, dtype=torch.int64, device=rows[0].device)
        picked = [r[index] for r in rows]
        out.append(picked[0] if single else picked)
    return out


def combine_sum_steps(top_k: int) -> list[tuple[int, int]]:
    """The combine summation tree as additions ``acc[a] += acc[b]``, in order; ``acc[0]`` holds
    the result.

    For ``top_k`` in :data:`COMBINE_PAIRWISE_TOP_K` a pairwise tree: the live partial sums
    start as ``acc[0 .. top_k-1]``; each level first sets aside the last live sum if their
    number is odd (a partial sum left over at that level), then adds adjacent pairs (the second
    of each pair into the first) and keeps the first of each pair live. When one live sum is
    left, the set-aside sums are added into ``acc[0]`` in ascending slot order. Otherwise the
    sum is sequential: ``acc[0] += acc[k]`` for ``k = 1 .. top_k-1``. Examples::

        top_k 4:  (0,1) (2,3) (0,2)
        top_k 6:  (0,1) (2,3) (4,5) (0,2) (0,4)             4 left over at level 2
        top_k 22: (0,1) .. (20,21); (0,2) .. (16,18); (0,4) (8,12); (0,8); (0,16) (0,20)
        top_k 3:  (0,1) (0,2)
    """
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"combine_sum_steps: top_k ({top_k}) must be in [1, {MAX_TOP_K}]")
    if top_k not in COMBINE_PAIRWISE_TOP_K:
        return [(0, k) for k in range(1, top_k)]
    steps: list[tuple[int, int]] = []
    live, left_over = list(range(top_k)), []
    while len(live) > 1:
        if len(live) % 2:
            left_over.append(live.pop())
        steps += [(live[i], live[i + 1]) for i in range(0, len(live), 2)]
        live = live[0::2]
    steps += [(0, s) for s in sorted(left_over)]
    return steps


def combine_sum(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """fp32 sum of ``top_k`` equally shaped terms along :func:`combine_sum_steps` (each term
    converted to fp32 first; every addition an fp32 operation). No final rounding."""
    acc = [t.to(torch.float32) for t in terms]
    for a, b in combine_sum_steps(len(acc)):
        acc[a] = acc[a] + acc[b]
    return acc[0]


def combine_reference(
    payloads_per_rank: Sequence[torch.Tensor],
    target_ranks: Sequence[torch.Tensor],
    send_indices: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Combine of every rank at once.

    Unfused equivalent, for each rank ``r`` and local token ``t`` (``T`` = the payload dtype,
    ``rd_T`` = round to nearest even into ``T``)::

        for k in 0 .. top_k-1:
            q, j = target_ranks[r][t, k], send_indices[r][t, k]
            term[k] = float32(payloads_per_rank[q][r, j]) if j >= 0 else +0.0
        out[r][t] = rd_T(combine_sum(term))      # the tree of combine_sum_steps(top_k)

    The sum is in fp32 with one final rounding. For ``top_k`` in {2, 4, 6, 8, 10, 16, 22} it
    is a pairwise tree (adjacent pairs, then pairs of pair-sums; a partial sum left over at a
    level is added into slot 0 at the end, left-overs in ascending slot order), otherwise
    sequential in ``k``; :func:`combine_sum_steps` lists the additions.

    ``payloads_per_rank[q]``: ``[W, R, H]`` float16, bfloat16 or float32 (the same on every
    rank): row ``[src, j]`` holds rank ``q``'s result for slot ``j`` received from ``src``;
    ``target_ranks[r]``, ``send_indices[r]``: ``[L_r, top_k]`` from dispatch (``-1`` pairs are
    skipped and count as +0.0). Returns per rank a new ``[L_r, H]`` tensor of ``T``. Exact:
    compare kernels with ``torch.equal``.
    """
    op = "combine_reference"
    w = _ep_size(op, len(payloads_per_rank))
    if len(target_ranks) != w or len(send_indices) != w:
        raise ValueError(f"{op}: target_ranks and send_indices must have {w} ranks")
    first = payloads_per_rank[0]
    if first.dtype not in _COMBINE_DTYPES:
        raise TypeError(f"{op}: payload dtype ({first.dtype}) must be float16, bfloat16 or float32")
    if first.dim() != 3 or first.shape[0] != w:
        raise ValueError(f"{op}: payloads must be [W={w}, R, H], got {tuple(first.shape)}")
    for q, p in enumerate(payloads_per_rank):
        if p.shape != first.shape or p.dtype != first.dtype:
            raise ValueError(
                f"{op}: payloads_per_rank[{q}] ({tuple(p.shape)}, {p.dtype}) differs from rank "
                f"0's ({tuple(first.shape)}, {first.dtype})"
            )
    r_max = first.shape[1]
    stacked = torch.stack(list(payloads_per_rank))  # [q, src, j, H]
    outputs = []
    for r in range(w):
        ranks = _ids(op, f"target_ranks[{r}]", target_ranks[r]).long()
        slots = _ids(op, f"send_indices[{r}]", send_indices[r]).long()
        if ranks.dim() != 2 or ranks.shape != slots.shape:
            raise ValueError(
                f"{op}: target_ranks[{r}] and send_indices[{r}] must be one [L, top_k] shape"
            )
        used = slots >= 0
        if not torch.equal(used, ranks >= 0) or (ranks >= w).any() or (slots >= r_max).any():
            raise ValueError(
                f"{op}: rank {r}: each (target rank, send index) must be a rank < {w} and a "
                f"slot < {r_max}, or both -1"
            )
        n, top_k = ranks.shape
        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"{op}: top_k ({top_k}) must be in [1, {MAX_TOP_K}]")
        terms = []
        for k in range(top_k):
            rows = stacked[ranks[:, k].clamp(min=0), r, slots[:, k].clamp(min=0)].float()
            terms.append(torch.where(used[:, k, None], rows, torch.zeros_like(rows)))
        outputs.append(combine_sum(terms).to(first.dtype))
    return outputs


def sanitize_reference(
    expert_ids: torch.Tensor, recv_counts: torch.Tensor, invalid_expert_id: int
) -> torch.Tensor:
    """One rank's received expert ids with every padding slot set to ``invalid_expert_id``.

    ``expert_ids``: ``[W, R, top_k]`` integer (the received copy of ``token_selected_experts``);
    ``recv_counts``: the rank's ``[W]`` counts. Slot ``(src, j)`` with ``j >=
    recv_counts[src]`` gets ``invalid_expert_id`` in all ``top_k`` entries; valid slots are
    left as they are, ids of experts owned by other ranks included. Returns a new tensor (the
    op works in place).
    """
    op = "sanitize_reference"
    _ids(op, "expert_ids", expert_ids)
    if expert_ids.dim() != 3 or expert_ids.shape[0] != len(recv_counts):
        raise ValueError(
            f"{op}: expert_ids must be [W={len(recv_counts)}, R, top_k], got "
            f"{tuple(expert_ids.shape)}"
        )
    r_max = expert_ids.shape[1]
    slot = torch.arange(r_max, device=expert_ids.device)
    counts = torch.as_tensor(recv_counts, device=expert_ids.device).to(torch.int64)
    padding = slot.unsqueeze(0) >= counts.unsqueeze(1)  # [W, R]
    out = expert_ids.clone()
    out[padding] = invalid_expert_id
    return out


# ---------------------------------------------------------------------------------------------
# MX block quantisation of combine outputs (NVFP4: reference.quant.quantize_nvfp4)

MX_BLOCK = 32
_MX_MAX_CODE = {"mxfp8": 448.0, "mxfp4": 6.0}


def _mx_scales(blocks: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    from .quant import round_scale_up_to_pow2

    m = blocks.abs().amax(dim=-1, keepdim=True)
    s = m / torch.tensor(_MX_MAX_CODE[kind], dtype=torch.float32, device=m.device)
    e = (round_scale_up_to_pow2(s).view(torch.int32) >> 23).clamp(1, 253)
    e = torch.where(m > 0, e, torch.zeros_like(e))
    k = ((254 - e) << 23).view(torch.float32)  # 2^(127 - e), exact
    return e.to(torch.uint8), torch.where(e > 0, k, torch.zeros_like(k))


def quantize_mx(y: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 or MXFP4 quantisation of each row in 32-element blocks, returning ``(codes, sf)``.

    Sequence, per block of 32 consecutive values of a row (fp32 arithmetic; ``M`` = 448 for
    ``"mxfp8"``, 6 for ``"mxfp4"``)::

        m = max_j |float(y_j)|                           # exact
        e = 0 if m == 0 else clamp(exponent(round_up_pow2(m / M)), 1, 253)   # the scale byte
        k = 2 ** (127 - e) if e else 0                   # exact
        mxfp8: q_j = e4m3(float(y_j) * k)                # saturating RNE, one byte per value
        mxfp4: q_j = e2m1_encode(float(y_j) * k)         # two codes per byte, low nibble first

    ``y``: ``[N, D]`` float16 or bfloat16 (the combine's rounded sum), ``D`` a multiple of 32.
    Returns ``codes`` (``float8_e4m3fn [N, D]`` or ``uint8 [N, D/2]``) and ``sf``: ``uint8
    [N, D/32]`` UE8M0 bytes in LINEAR order (``reference.quant.write_scale_factors`` places
    them in the swizzled layouts). The kernel's bytes compare with ``torch.equal``.
    """
    from .fusion import fp8_e4m3
    from .quant import e2m1_encode, pack_e2m1

    op = "quantize_mx"
    if kind not in _MX_MAX_CODE:
        raise ValueError(f"{op}: kind must be 'mxfp8' or 'mxfp4', got {kind!r}")
    if y.dim() != 2 or y.shape[1] % MX_BLOCK:
        raise ValueError(f"{op}: y must be [N, D] with D a multiple of 32, got {tuple(y.shape)}")
    n, d = y.shape
    blocks = y.float().reshape(n, d // MX_BLOCK, MX_BLOCK)
    sf, k = _mx_scales(blocks, kind)
    scaled = (blocks * k).reshape(n, d)
    codes = fp8_e4m3(scaled) if kind == "mxfp8" else pack_e2m1(e2m1_encode(scaled))
    return codes, sf.reshape(n, d // MX_BLOCK)


def dequantize_mx(codes: torch.Tensor, sf: torch.Tensor, kind: str) -> torch.Tensor:
    """Approximate inverse of :func:`quantize_mx`: ``y_j = decode(q_j) * 2 ** (e_b - 127)``
    (0 where ``e_b`` is 0). Returns fp32 ``[N, D]``."""
    from .quant import e2m1_decode, ue8m0_decode, unpack_e2m1

    n = codes.shape[0]
    if kind == "mxfp8":
        values = codes.view(torch.float8_e4m3fn).float()
    else:
        values = e2m1_decode(unpack_e2m1(codes.view(torch.uint8)))
    d = values.shape[1]
    scale = ue8m0_decode(sf.reshape(n, d // MX_BLOCK)).unsqueeze(-1)
    return (values.reshape(n, d // MX_BLOCK, MX_BLOCK) * scale).reshape(n, d)


def combine_low_precision_reference(
    payloads_per_rank: Sequence[torch.Tensor],
    target_ranks: Sequence[torch.Tensor],
    send_indices: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Combine of every rank at once with the rows on the low-precision wire
    (``use_low_precision=True``), bit for bit.

    Unfused equivalent: every payload row (float16 or bfloat16, ``H`` a multiple of 32) goes as
    its MXFP8 (:func:`quantize_mx` ``"mxfp8"``) and comes back decoded exactly
    (:func:`dequantize_mx`, fp32); then :func:`combine_reference`'s sum, rounded once to
    bfloat16. Returns per rank ``[L_r, H]`` bfloat16.
    """
    wire = []
    for p in payloads_per_rank:
        w, r, h = p.shape
        codes, sf = quantize_mx(p.reshape(w * r, h), "mxfp8")
        wire.append(dequantize_mx(codes, sf, "mxfp8").reshape(w, r, h))
    sums = combine_reference(wire, target_ranks, send_indices)  # fp32 terms, fp32 sums
    return [s.to(torch.bfloat16) for s in sums]
