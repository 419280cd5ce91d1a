"""The MoE all-to-all on GPUs (MoeAlltoAll and the free functions), compared with
fusedcomm.reference.moe_a2a.

Every rank builds every rank's inputs from seeds, so each can compute the all-rank reference.
Payload rows carry their source (rank, token) in exact values (the first three bf16 elements
of the hidden row, column 0 of the fp32 payload, the first four bytes of the uint8 payload),
and the received region, the top-k tables and the recv counters are poisoned before each
dispatch, so a misrouted or unwritten row is caught. Dispatch: recv counts and target ranks
equal the reference's, send indices are a permutation per (source, destination), each row
sits at the slot its source recorded, and the received rows per source are the reference's
multiset. Combine: exact (torch.equal) against the reference of the kernel's own tables, and
bitwise the same when a round is repeated with the same routing.
"""

import math
import time

import pytest
import torch

import fusedcomm as comm
from fusedcomm import Mapping, MoeAlltoAll
from fusedcomm.ops.moe_alltoall import MoeA2AArgumentError, MoeA2AStateError
from fusedcomm.reference.moe_a2a import (
    combine_reference,
    dispatch_reference,
    received_rows,
    sanitize_reference,
)
from fusedcomm.runtime.moe_a2a_workspace import MoeA2ALayout
from fusedcomm.testing.checks import Failures, assert_no_failures
from fusedcomm.testing.dist import barrier, gather_all, run_ranks

MAX_TOKENS = 2048
TOKENS = (0, 1, 17, 1024, MAX_TOKENS)
TOP_K = (1, 2, 5, 8, 22)
EXPERTS = (2, 7, 64, 256)
HIDDENS = (2048, 7168)
COMBINE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EXTRA_BYTES = 16  # the uint8 payload's row
TAG = 100000  # a row's tag: rank * TAG + token
INVALID = -7  # what sanitize writes into padding slots
META_RECV, META_TARGETS, META_SLOTS = 3, 6, 7  # metainfo indices of the fields read here
# Per token: ids and scales at top_k 22, the widest hidden row, the uint8 row; fp32 combine.
DISPATCH_BYTES = 4 * 22 * 2 + 2 * max(HIDDENS) + EXTRA_BYTES
COMBINE_BYTES = 4 * max(HIDDENS)


def _mapping(rank, world):
    return Mapping(world, rank, tp_size=world, moe_ep_size=world)


def _size(world, max_tokens):
    return comm.moe_a2a_get_workspace_size_per_rank(
        world, max_tokens, DISPATCH_BYTES, COMBINE_BYTES
    )


def _quiesce():
    """Every rank's earlier work is done (its reads of peers' rows included)."""
    torch.cuda.synchronize()
    barrier()
    torch.cuda.synchronize()


# --- inputs -----------------------------------------------------------------------------------


def _experts(seed, rank, n, top_k, num_experts, distinct):
    g = torch.Generator(device="cuda").manual_seed(seed * 1000 + rank)
    if distinct:  # top_k different experts per token
        keys = torch.rand(n, num_experts, generator=g, device="cuda")
        return keys.argsort(dim=1)[:, :top_k].to(torch.int32).contiguous()
    return torch.randint(0, num_experts, (n, top_k), generator=g, device="cuda", dtype=torch.int32)


def _out_of_range(seed, rank, n, top_k, num_experts):
    """Ids of which about a third lie outside [0, E); token 0 has no valid id at all."""
    ids = _experts(seed, rank, n, top_k, num_experts, True)
    g = torch.Generator(device="cuda").manual_seed(seed * 1000 + rank + 200)
    bad = torch.tensor(
        [-1, -5, num_experts, num_experts + 100, 1 << 30, -(1 << 31)],
        dtype=torch.int32,
        device="cuda",
    )
    pick = torch.randint(0, bad.numel(), (n, top_k), generator=g, device="cuda")
    mask = torch.rand(n, top_k, generator=g, device="cuda") < 0.3
    if n:
        mask[0] = True
    return torch.where(mask, bad[pick], ids)


def _hidden_index(count):
    return (0, 1, 2, 2)[count - 1]


def _payloads(seed, rank, experts, hidden, count, strided):
    """``count`` (1..4) payloads, largest element size first: [hidden], [ids, hidden],
    [ids, scales, hidden], [ids, scales, hidden, bytes]. ``strided``: the hidden rows lie
    3 elements into rows of a wider tensor (a storage offset and a row stride that are not
    multiples of 16 bytes)."""
    n, top_k = experts.shape
    g = torch.Generator(device="cuda").manual_seed(seed * 1000 + rank + 100)
    token = torch.arange(n, device="cuda")
    tag = rank * TAG + token
    wide = torch.randn(n, hidden + 67, generator=g, device="cuda").to(torch.bfloat16)
    h = wide[:, 3 : 3 + hidden] if strided else wide[:, :hidden].contiguous()
    h[:, 0] = rank  # small integers: exact in bf16
    h[:, 1] = token // 256
    h[:, 2] = token % 256
    scales = torch.rand(n, top_k, generator=g, device="cuda")
    scales[:, 0] = tag.float()  # exact in fp32
    extra = torch.randint(0, 256, (n, EXTRA_BYTES), generator=g, device="cuda", dtype=torch.uint8)
    extra[:, :4] = tag.to(torch.int32).view(torch.uint8).view(n, 4)
    ordered = [experts.clone(), scales, h, extra]  # int32, fp32, bf16, uint8
    return {1: [h], 2: [ordered[0], h], 3: ordered[:3], 4: ordered}[count]


def _inputs(seed, world, tokens, top_k, num_experts, hidden, count, distinct=True, strided=False):
    """Every rank's (experts, payloads)."""
    experts = [_experts(seed, q, tokens[q], top_k, num_experts, distinct) for q in range(world)]
    payloads = [_payloads(seed, q, experts[q], hidden, count, strided) for q in range(world)]
    return experts, payloads


def _expert(received_hidden, rank, dtype):
    """The 'experts' of this rank: a function of the row's content and the rank only."""
    return (received_hidden.float() * (rank + 1) + 0.03125 * (rank + 1)).to(dtype)


# --- the workspace, seen from the test ------------------------------------------------------


def _poison(a2a, rank, world):
    """Fill this rank's recv counters, top-k tables and payload data with garbage, while no
    peer touches the row."""
    meta = [int(v) for v in a2a.metainfo]
    row = a2a.workspace[rank]
    _quiesce()
    row[meta[META_RECV] : meta[META_RECV] + 4 * world].fill_(0x7F)
    row[meta[META_TARGETS] : meta[-1]].fill_(0x7F)
    row[meta[-1] :].fill_(0xFF)  # NaN in bf16/fp16/fp32, -1 in int32
    _quiesce()


def _tables(a2a, rank, world, n):
    """The kernel's (target ranks, send indices) [n, top_k] and recv counts [W] of this rank."""
    ws, meta, m = a2a.workspace, a2a.metainfo, a2a.max_num_tokens

    def view(index, lead, nbytes):
        start = rank * ws.stride(0) + int(meta[index])
        return comm.moe_a2a_wrap_payload_tensor_in_workspace(
            ws, lead, start, start + nbytes, torch.int32
        )

    targets = view(META_TARGETS, [m], 88 * m)[:n, : a2a.top_k].clone()
    slots = view(META_SLOTS, [m], 88 * m)[:n, : a2a.top_k].clone()
    counts = view(META_RECV, [], 4 * world).clone()
    return targets, slots, counts


def _pad(t, rows):
    out = torch.full((rows, t.shape[1]), -1, dtype=torch.int32, device="cuda")
    out[: t.shape[0]] = t
    return out


def _sane(t, s, world, r):
    ranks_ok = bool(((t >= -1) & (t < world)).all())
    slots_ok = bool(((s >= -1) & (s < r)).all())
    return ranks_ok and slots_ok and torch.equal(t >= 0, s >= 0)


# --- checks -----------------------------------------------------------------------------------


def _check_dispatch(f, what, a2a, rank, world, experts, payloads, r, received):
    """Compare one dispatch with the reference; returns (sane, targets, slots): every rank's
    tables padded to [R, top_k] and whether they index the group at all."""
    tokens = [e.shape[0] for e in experts]
    ref = dispatch_reference(experts, payloads, a2a.num_experts, r)
    targets, slots, counts = _tables(a2a, rank, world, tokens[rank])
    for i, (got, p) in enumerate(zip(received, payloads[rank], strict=True)):
        f.check(
            got.shape == (world, r, *p.shape[1:]) and got.dtype == p.dtype,
            f"{what}: received[{i}] is {tuple(got.shape)} {got.dtype}",
        )
    counts_ok = f.check(
        torch.equal(counts, ref.recv_counts[rank]),
        f"{what}: recv counts {counts.tolist()}, expected {ref.recv_counts[rank].tolist()}",
    )
    f.check(torch.equal(targets, ref.target_ranks[rank]), f"{what}: target ranks differ")
    f.check(torch.equal(slots >= 0, ref.send_indices[rank] >= 0), f"{what}: sending pairs differ")
    for d in range(world):
        n = int(ref.recv_counts[d][rank])
        picked = slots[targets == d].sort().values
        want = torch.arange(n, dtype=torch.int32, device="cuda")
        f.check(
            torch.equal(picked, want), f"{what}: send indices to rank {d} are not a permutation"
        )
    g_t, g_s = gather_all(_pad(targets, r)), gather_all(_pad(slots, r))
    sane = all(_sane(t, s, world, r) for t, s in zip(g_t, g_s, strict=True))
    f.check(sane, f"{what}: some rank's top-k tables point outside the group or the slots")
    if sane:  # each token from each source sits in the slot the source recorded
        for src in range(world):
            tok, kk = (g_t[src][: tokens[src]] == rank).nonzero(as_tuple=True)
            j = g_s[src][: tokens[src]][tok, kk].long()
            for i, got in enumerate(received):
                f.check(
                    torch.equal(got[src, j], payloads[src][i][tok]),
                    f"{what}: payload {i} rows from rank {src} are not where its send indices say",
                )
    if counts_ok:
        top = max(int(counts.max()), 0)
        mine = received_rows([p[:, :top].cpu() for p in received], counts.cpu())
        want = received_rows([p[:, :top].cpu() for p in ref.recv[rank]], counts.cpu())
        for src in range(world):
            same = all(torch.equal(a, b) for a, b in zip(mine[src], want[src], strict=True))
            f.check(same, f"{what}: rows received from rank {src} differ from the reference")
    return sane, g_t, g_s


def _check_combine(f, what, rank, world, tokens, y, got, sane, g_t, g_s):
    everyone = gather_all(y)  # collective: every rank calls it, sane or not
    if not sane:
        return
    targets = [t[:n] for t, n in zip(g_t, tokens, strict=True)]
    slots = [s[:n] for s, n in zip(g_s, tokens, strict=True)]
    want = combine_reference(everyone, targets, slots)[rank]
    ok = got.shape == want.shape and got.dtype == want.dtype
    f.check(ok, f"{what}: combine output {tuple(got.shape)} {got.dtype}")
    if ok and not torch.equal(got, want):
        bad = int((got != want).sum())
        f.check(False, f"{what}: combine differs from the reference in {bad} elements")


def _round(f, what, a2a, rank, world, experts, payloads, r, hidden_index, dtype, **opts):
    """One checked round (dispatch, experts, combine) of MoeAlltoAll on every rank. Options:
    in_ws (the payload lives in the workspace), poison_out (combine into a NaN-filled output),
    invalid_id (sanitize through dispatch), between(received) (runs after the dispatch)."""
    tokens = [e.shape[0] for e in experts]
    _poison(a2a, rank, world)
    kwargs = {}
    if opts.get("invalid_id") is not None:
        kwargs = {"invalid_token_expert_id": opts["invalid_id"], "expert_id_payload_index": 0}
    received = a2a.dispatch(experts[rank], payloads[rank], r, **kwargs)
    f.check(a2a.phase == "dispatched", f"{what}: phase {a2a.phase!r} after dispatch")
    if opts.get("between") is not None:
        opts["between"](received)
    sane, g_t, g_s = _check_dispatch(f, what, a2a, rank, world, experts, payloads, r, received)
    hidden = received[hidden_index].shape[-1]
    y = _expert(received[hidden_index], rank, dtype)
    if opts.get("in_ws"):
        view = a2a.get_combine_payload_tensor_in_workspace(r, hidden, dtype)
        f.check(view.shape == (world, r, hidden) and view.dtype == dtype, f"{what}: payload view")
        y = view.copy_(y)
    mine = y.clone()
    out = None
    if opts.get("poison_out"):
        out = torch.full((tokens[rank], hidden), float("nan"), dtype=dtype, device="cuda")
    got = a2a.combine(y, r, payload_in_workspace=bool(opts.get("in_ws")), output=out)
    f.check(out is None or got is out, f"{what}: combine did not return the given output")
    f.check(a2a.phase == "idle", f"{what}: phase {a2a.phase!r} after combine")
    _check_combine(f, what, rank, world, tokens, mine, got, sane, g_t, g_s)
    return got


# --- dispatch and combine over the axes -------------------------------------------------------


def _matrix_cases(world):
    cases = []
    pairs = [(k, e) for e in EXPERTS for k in TOP_K if e >= world]
    for i, (top_k, e) in enumerate(pairs):
        tokens = [TOKENS[(i + 2 * q) % len(TOKENS)] for q in range(world)]  # unequal
        cases.append(
            {
                "seed": 1 + i,
                "top_k": top_k,
                "experts": e,
                "tokens": tokens,
                "r": max(max(tokens), 1) if i % 3 else MAX_TOKENS,
                "count": 1 + i % 4,
                "hidden": HIDDENS[(i // 2) % 2],
                "distinct": top_k <= e and i % 5 != 4,  # else ids may repeat within a token
                "strided": i % 3 == 1,
                "dtype": COMBINE_DTYPES[(i // 4) % 3],
                "in_ws": i % 2 == 1,
                "poison_out": (i // 2) % 2 == 0,
                "repeat": i % 5 == 0,
            }
        )
    fixed = {"distinct": True, "poison_out": True, "repeat": True}
    none_sent = {"top_k": 8, "experts": 256, "tokens": [0] * world, "r": 1, "count": 2}
    none_sent.update(hidden=2048, strided=False, dtype=torch.bfloat16, in_ws=False)
    full = {"top_k": 22, "experts": 64, "tokens": [MAX_TOKENS] * world, "r": MAX_TOKENS}
    full.update(count=4, hidden=7168, strided=True, dtype=torch.float32, in_ws=True)
    for extra in (none_sent, full):
        cases.append({**fixed, **extra, "seed": len(cases) + 1})
    return cases


def _rank_matrix(rank, world):
    f = Failures()
    instances, size = {}, _size(world, MAX_TOKENS)
    for c in _matrix_cases(world):
        key = (c["top_k"], c["experts"])
        if key not in instances:  # one workspace (same size and max_num_tokens) for all
            instances[key] = MoeAlltoAll(_mapping(rank, world), MAX_TOKENS, *key, size)
        a2a = instances[key]
        experts, payloads = _inputs(
            c["seed"], world, c["tokens"], *key, c["hidden"], c["count"], c["distinct"],
            c["strided"],
        )  # fmt: skip
        what = (
            f"top_k={c['top_k']} E={c['experts']} tokens={c['tokens']} R={c['r']} "
            f"payloads={c['count']} H={c['hidden']} {c['dtype']} in_ws={c['in_ws']}"
        )
        args = (a2a, rank, world, experts, payloads, c["r"], _hidden_index(c["count"]))
        opts = {"in_ws": c["in_ws"], "poison_out": c["poison_out"]}
        first = _round(f, what, *args, c["dtype"], **opts)
        if c["repeat"]:
            again = _round(f, what + " (again)", *args, c["dtype"], **opts)
            f.check(torch.equal(first, again), f"{what}: a repeated round differs bitwise")
    _quiesce()
    return f.messages


@pytest.mark.gpu(2)
def test_dispatch_and_combine_match_the_reference(world_size):
    assert_no_failures(run_ranks(_rank_matrix, world_size, backend="nccl", timeout_s=600))


# --- sanitize, out-of-range ids, misuse of the state machine ------------------------------------


def _sanitize(f, a2a, rank, world, experts, payloads, r):
    """Padding slots get the invalid id, received slots stay: through the free function (exact
    against the reference of the ids before) and through dispatch(invalid_token_expert_id)."""
    args = (a2a, rank, world, experts, payloads, r, 1)

    def free(received):
        before = received[0].clone()
        counts = _tables(a2a, rank, world, 0)[2]
        comm.moe_a2a_sanitize_expert_ids(received[0], a2a.workspace, a2a.metainfo, rank, INVALID)
        want = sanitize_reference(before, counts, INVALID)
        f.check(torch.equal(received[0], want), "sanitize (free function) differs from reference")

    def in_dispatch(received):
        counts = _tables(a2a, rank, world, 0)[2]
        padded = sanitize_reference(received[0], counts, a2a.num_experts + 5)
        f.check(torch.equal(received[0], padded), "dispatch(invalid_token_expert_id) padding")

    _round(f, "sanitize", *args, torch.bfloat16, between=free)
    invalid = a2a.num_experts + 5
    _round(f, "sanitize in dispatch", *args, torch.float16, invalid_id=invalid, between=in_dispatch)


def _misuse(f, a2a, rank, world, experts, payloads, r):
    hidden = payloads[rank][1].shape[1]
    y = torch.zeros(world, r, hidden, dtype=torch.bfloat16, device="cuda")

    def raises(cls, what, call, *args):
        try:
            call(*args)
        except cls:
            return
        except Exception as e:  # reported as a failed check
            f.check(False, f"{what}: raised {type(e).__name__} ({e}), expected {cls.__name__}")
            return
        f.check(False, f"{what}: did not raise {cls.__name__}")

    bf16, view = torch.bfloat16, a2a.get_combine_payload_tensor_in_workspace
    raises(MoeA2AStateError, "combine before dispatch", a2a.combine, y, r)
    raises(AssertionError, "combine before dispatch, as an assert", a2a.combine, y, r)
    raises(RuntimeError, "payload view before dispatch", view, r, hidden, bf16)
    too_many = a2a.max_num_tokens + 1
    raises(
        MoeA2AArgumentError, "R too large", a2a.dispatch, experts[rank], payloads[rank], too_many
    )
    f.check(a2a.phase == "idle", f"misuse: phase {a2a.phase!r} after refused calls")
    _poison(a2a, rank, world)
    received = a2a.dispatch(experts[rank], payloads[rank], r)
    raises(MoeA2AStateError, "dispatch twice", a2a.dispatch, experts[rank], payloads[rank], r)
    other = torch.zeros(world, r - 1, hidden, dtype=bf16, device="cuda")
    raises(ValueError, "combine with another R", a2a.combine, other, r - 1)
    raises(ValueError, "payload view with another R", view, r - 1, hidden, bf16)
    f.check(a2a.phase == "dispatched", f"misuse: phase {a2a.phase!r} after refused calls")
    what = "round after misuse"
    sane, g_t, g_s = _check_dispatch(f, what, a2a, rank, world, experts, payloads, r, received)
    y = _expert(received[1], rank, torch.bfloat16)
    got = a2a.combine(y, r)
    tokens = [e.shape[0] for e in experts]
    _check_combine(f, what, rank, world, tokens, y, got, sane, g_t, g_s)
    f.check(a2a.phase == "idle", f"misuse: phase {a2a.phase!r} after combine")


def _received_views(a2a, rank, world, payloads, r):
    """What moe_a2a_dispatch returns, built from the workspace layout
    (``include/fusedcomm/layout/moe_a2a.cuh``)."""
    sizes = [math.prod(p.shape[1:]) * p.element_size() for p in payloads]
    layout = MoeA2ALayout(world, a2a.max_num_tokens)
    row = a2a.workspace[rank]
    views = []
    for p, start, b in zip(payloads, layout.dispatch_payload_offsets(r, sizes), sizes, strict=True):
        views.append(row[start : start + world * r * b].view(p.dtype).view(world, r, *p.shape[1:]))
    return views, layout.combine_payload_offset(r, sizes)


def _checked_round(f, what, a2a, rank, world, experts, payloads, r, expect_error):
    """A round of the free functions with check_expert_ids=True; after a ValueError (raised
    after the launch, on every rank) the round is finished with the combine it still needs."""
    _poison(a2a, rank, world)
    before = comm.moe_a2a_dropped_expert_ids(a2a.workspace, rank)
    error = None
    try:
        comm.moe_a2a_dispatch(
            experts[rank], payloads[rank], a2a.workspace, a2a.metainfo, r, rank, world,
            a2a.top_k, a2a.num_experts, check_expert_ids=True,
        )  # fmt: skip
    except ValueError as e:
        error = e
    f.check((error is not None) == expect_error, f"{what}: check_expert_ids raised {error!r}")
    f.check(error is None or "outside" in str(error), f"{what}: message {error}")
    ids = experts[rank]
    dropped = int(((ids < 0) | (ids >= a2a.num_experts)).sum())
    got_dropped = comm.moe_a2a_dropped_expert_ids(a2a.workspace, rank) - before
    f.check(got_dropped == dropped, f"{what}: dropped {got_dropped} ids, expected {dropped}")
    received, offset = _received_views(a2a, rank, world, payloads[rank], r)
    sane, g_t, g_s = _check_dispatch(f, what, a2a, rank, world, experts, payloads, r, received)
    y = _expert(received[1], rank, torch.bfloat16)
    got = comm.moe_a2a_combine(
        y, experts[rank].shape[0], a2a.workspace, a2a.metainfo, r, rank, world, a2a.top_k, offset
    )
    tokens = [e.shape[0] for e in experts]
    _check_combine(f, what, rank, world, tokens, y, got, sane, g_t, g_s)


def _rank_ids_and_state(rank, world):
    f = Failures()
    m, hidden = 256, 2048
    tokens = [37 + 13 * q for q in range(world)]
    tokens[0] = 0  # a rank with nothing to send
    r = max(tokens) + 3  # every source leaves padding slots
    e = max(16, world)
    a = MoeAlltoAll(_mapping(rank, world), m, 4, e, workspace_size_per_rank=_size(world, m))
    experts, payloads = _inputs(40, world, tokens, 4, e, hidden, 2)
    _sanitize(f, a, rank, world, experts, payloads, r)
    _misuse(f, a, rank, world, experts, payloads, r)
    _round(f, "usable after misuse", a, rank, world, experts, payloads, r, 1, torch.float32)

    # Out-of-range ids: dropped and counted, the valid pairs of the same tokens still routed.
    e = 10 + world
    b = MoeAlltoAll(_mapping(rank, world), m, 3, e, workspace_size_per_rank=_size(world, m))
    tokens = [29 + 11 * q for q in range(world)]
    r = max(tokens)
    experts = [_out_of_range(41, q, tokens[q], 3, e) for q in range(world)]
    payloads = [_payloads(41, q, experts[q], hidden, 3, True) for q in range(world)]
    before = b.dropped_expert_ids()
    _round(f, "out-of-range ids", b, rank, world, experts, payloads, r, 2, torch.bfloat16)
    dropped = int(((experts[rank] < 0) | (experts[rank] >= e)).sum())
    got = b.dropped_expert_ids() - before
    f.check(dropped > 0 and got == dropped, f"dropped_expert_ids: {got}, expected {dropped}")

    # check_expert_ids=True on a fresh workspace (another max_num_tokens): a clean round
    # passes, a round with bad ids raises ValueError on every rank, the next clean one passes.
    c = MoeAlltoAll(_mapping(rank, world), 200, 3, e, workspace_size_per_rank=_size(world, 200))
    clean, clean_payloads = _inputs(42, world, tokens, 3, e, hidden, 2)
    bad = [_out_of_range(43, q, tokens[q], 3, e) for q in range(world)]
    bad_payloads = [_payloads(43, q, bad[q], hidden, 2, False) for q in range(world)]
    _checked_round(f, "checked, clean", c, rank, world, clean, clean_payloads, r, False)
    _checked_round(f, "checked, bad ids", c, rank, world, bad, bad_payloads, r, True)
    _checked_round(f, "checked, clean again", c, rank, world, clean, clean_payloads, r, False)
    _quiesce()
    return f.messages


@pytest.mark.gpu(2)
def test_sanitize_out_of_range_ids_and_misuse(world_size):
    assert_no_failures(run_ranks(_rank_ids_and_state, world_size, backend="nccl", timeout_s=300))


# --- CUDA graph -------------------------------------------------------------------------------


def _rank_graph(rank, world):
    f = Failures()
    m, r, top_k, hidden = 128, 96, 8, 2048
    e = max(64, world)
    tokens = [max(r - 7 * q, 1) for q in range(world)]
    a2a = MoeAlltoAll(_mapping(rank, world), m, top_k, e, workspace_size_per_rank=_size(world, m))
    experts, payloads = _inputs(60, world, tokens, top_k, e, hidden, 2)
    ids_in, hid_in = payloads[rank][0].clone(), payloads[rank][1].clone()
    experts[rank], payloads[rank] = ids_in, [ids_in, hid_in]
    _round(f, "eager warm-up", a2a, rank, world, experts, payloads, r, 1, torch.bfloat16)
    out = torch.empty(tokens[rank], hidden, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    _quiesce()
    with torch.cuda.graph(graph):
        received = a2a.dispatch(ids_in, [ids_in, hid_in], r)
        y = _expert(received[1], rank, torch.bfloat16)
        a2a.combine(y, r, output=out)
    _quiesce()
    f.check(a2a.phase == "idle", f"graph: phase {a2a.phase!r} after capture")
    for replay in range(4):
        experts, payloads = _inputs(61 + replay, world, tokens, top_k, e, hidden, 2)  # all new
        ids_in.copy_(experts[rank])
        hid_in.copy_(payloads[rank][1])
        _poison(a2a, rank, world)
        out.fill_(float("nan"))
        graph.replay()
        what = f"graph replay {replay}"
        sane, g_t, g_s = _check_dispatch(f, what, a2a, rank, world, experts, payloads, r, received)
        _check_combine(f, what, rank, world, tokens, y, out, sane, g_t, g_s)
    _quiesce()
    del graph
    return f.messages


@pytest.mark.gpu(2)
def test_cuda_graph_replays_with_new_routing(world_size):
    assert_no_failures(run_ranks(_rank_graph, world_size, backend="nccl", timeout_s=300))


# --- a missing peer -------------------------------------------------------------------------


def _failure_of(call):
    try:
        call()
    except comm.CommFailureError as e:
        return e
    return None


def _rank_missing_peer(rank, world):
    """The last rank skips a dispatch: the others raise within the timeout (never hang); the
    late rank raises at its late round, and every later call is refused."""
    f = Failures()
    skipper, top_k, hidden, r = world - 1, 2, 2048, 32
    e = max(8, world)
    a2a = MoeAlltoAll(_mapping(rank, world), 64, top_k, e, hidden_size=hidden, timeout_s=2.0)
    experts, payloads = _inputs(80, world, [20] * world, top_k, e, hidden, 2)
    _round(f, "healthy round", a2a, rank, world, experts, payloads, r, 1, torch.bfloat16)
    y = torch.zeros(world, r, hidden, dtype=torch.bfloat16, device="cuda")
    _quiesce()
    if rank != skipper:
        start = time.monotonic()
        error = _failure_of(
            lambda: (
                a2a.dispatch(experts[rank], payloads[rank], r),
                torch.cuda.synchronize(),  # returns: the kernel gives up, it does not trap
                comm.check_errors(),
            )
        )
        waited = time.monotonic() - start
        f.check(error is not None, "no CommFailureError at check_errors() after a lost peer")
        f.check(waited < 12.0, f"the dispatch took {waited:.1f} s with timeout_s=2")
        if a2a.phase == "dispatched":
            refused = _failure_of(lambda: a2a.combine(y, r))
        else:
            refused = _failure_of(lambda: a2a.dispatch(experts[rank], payloads[rank], r))
        f.check(refused is not None and "refused" in str(refused), f"next call: {refused!r}")
        barrier()  # the skipper may come now
    else:
        barrier()
        error = _failure_of(
            lambda: (
                a2a.dispatch(experts[rank], payloads[rank], r),
                a2a.combine(y, r),
                torch.cuda.synchronize(),
                comm.check_errors(),
            )
        )
        f.check(error is not None, "the late rank completed a round its peer had abandoned")
        refused = _failure_of(lambda: comm.moe_a2a_dropped_expert_ids(a2a.workspace, rank))
        f.check(refused is not None, "the late rank's workspace is not refused afterwards")
    torch.cuda.synchronize()
    barrier()
    return f.messages, type(error).__name__


@pytest.mark.gpu(2)
def test_missing_peer_raises_instead_of_hanging(world_size):
    results = run_ranks(_rank_missing_peer, world_size, backend="nccl", timeout_s=180)
    assert_no_failures([messages for messages, _ in results])
    names = [name for _, name in results]
    assert "PeerTimeoutError" in names[:-1], names
    if world_size == 2:
        assert names[0] == "PeerTimeoutError", names
