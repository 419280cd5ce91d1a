"""Benchmark of the MoE all-to-all (``MoeAlltoAll`` dispatch / combine) beside the same exchange
built from NCCL ``all_to_all_single``, all in one run on the same GPUs.

Shapes (DeepSeek-V3-like): hidden 7168 bf16, top-8 of 256 experts, random routing with distinct
experts per token, ``L`` tokens per rank and ``R = L``. Dispatch sends ``[hidden bf16 [L, 7168],
expert ids int32 [L, 8], router weights fp32 [L, 8]]``; combine brings back a bf16 ``[W, R, 7168]``
payload (a preallocated tensor standing for the experts' output) and sums it per token.

Per token count and implementation, microseconds per call (median of 5 timed loops, CUDA
events), eager and in CUDA graphs: dispatch alone and combine alone (called in turn, one round
at a time, with an event between them; in graph mode each is its own graph and the GPU is held
back until the host has queued the whole loop, so no launch gap is timed), and a round
(dispatch + combine; in graph mode a graph of many rounds). Ours also runs the round with
``payload_in_workspace=True`` in a graph. Neither op can be looped alone: a round is
``dispatch -> combine`` (``MoeAlltoAll`` refuses two dispatches in a row, and the kernels' flags
expect the combine in between), hence the events inside rounds.

The NCCL implementation:

* dispatch = routing with torch ops (owner ranks of the token's experts; timed, as our kernel
  routes too), an ``all_to_all_single``
  of the per-destination counts (``[W]`` int64), the rows packed as bytes (hidden, ids, weights
  side by side: one ``torch.cat``), gathered by index per destination and sent with one
  ``all_to_all_single``. One packed call rather than three (hidden, ids, weights) because each
  NCCL call costs a launch and a rendezvous, while the packing copy is one pass over the local
  rows. Not measured against the three-call version here.
* combine = the reverse ``all_to_all_single`` of the payload rows, then ``index_add_`` into an
  fp32 accumulator per token and one rounding to bf16.
* "NCCL padded": equal splits, every rank sends ``R`` rows to every rank (the worst case),
  so nothing depends on the counts on the host: capturable, used eager and in graphs.
* "NCCL exact (eager)": splits of the real counts (``.tolist()``: a host synchronisation), the
  same rows ours sends; eager only.

Correctness guard: after the timed loops of each size every timed variant runs once more and is
compared exactly (``torch.equal``) with a torch reference of that round; a variant that does not
match reports ``WRONG`` instead of its times. Eager: the "experts" return the received hidden
row, so a token's combine output is its own hidden row times the number of distinct ranks
owning its experts (exact in fp32, rounded once). Graphs (the payload is captured): rank ``q``'s
payload holds ``q + 1`` everywhere, so a token's output is the sum of ``q + 1`` over its owner
ranks, whatever slots the dispatch chose. All ranks agree on every verdict; each time is the
slowest rank's.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..mapping import Mapping
from ..ops.moe_alltoall import MoeAlltoAll
from ..reference.moe_a2a import expert_owner
from .timing import capture, time_graph, time_loop

HIDDEN = 7168
TOP_K = 8
EXPERTS = 256
TOKENS = (1, 16, 128, 1024, 4096)
QUICK_TOKENS = (1, 16, 128, 1024)
# The targets: (tokens per rank, dispatch + combine microseconds); and faster than NCCL.
TARGETS = ((16, 25.0), (1024, 90.0))
IMPLS = (
    ("ours", "fusedcomm"),
    ("nccl_padded", "NCCL padded"),
    ("nccl_exact", "NCCL exact (eager)"),
)
COLUMNS = (
    ("dispatch_eager", "dispatch eager"),
    ("combine_eager", "combine eager"),
    ("round_eager", "round eager"),
    ("dispatch_graph", "dispatch graph"),
    ("combine_graph", "combine graph"),
    ("round_graph", "round graph"),
    ("round_graph_ws", "round graph, payload in workspace (+ a fill of it)"),
)
WRONG = "WRONG"
# GPU cycles the stream sleeps before a graph-mode split loop (~10 ms at 2 GHz): long enough for
# the host to queue the whole loop, so the events time only the GPU.
_SLEEP_CYCLES = 20_000_000
# Bound on every device-side wait for a peer: generous, as the ranks' hosts drift apart while
# they capture graphs.
_TIMEOUT_S = 120.0


def _iters(nbytes: int) -> int:
    if nbytes <= 1 << 20:
        return 100
    return 50 if nbytes <= 8 << 20 else (20 if nbytes <= 64 << 20 else 10)


def _split_us(
    dispatch: Callable[[], None],
    combine: Callable[[], None],
    iters: int,
    *,
    ahead: bool = False,
    repeats: int = 5,
    warmup: int = 3,
) -> tuple[float, float]:
    """Median microseconds per call of ``dispatch`` and of ``combine``, called in turn with a
    CUDA event after each. ``ahead``: the stream first sleeps (after a barrier) so the host
    queues the whole loop before the GPU starts it (for graph replays)."""
    for _ in range(warmup):
        dispatch()
        combine()
    torch.cuda.synchronize()
    d_samples, c_samples = [], []
    for _ in range(repeats):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2 * iters + 1)]
        if ahead:
            dist.barrier()
            torch.cuda._sleep(_SLEEP_CYCLES)
        events[0].record()
        for i in range(iters):
            dispatch()
            events[2 * i + 1].record()
            combine()
            events[2 * i + 2].record()
        events[-1].synchronize()
        d_ms = sum(events[2 * i].elapsed_time(events[2 * i + 1]) for i in range(iters))
        c_ms = sum(events[2 * i + 1].elapsed_time(events[2 * i + 2]) for i in range(iters))
        d_samples.append(d_ms * 1000.0 / iters)
        c_samples.append(c_ms * 1000.0 / iters)
    return statistics.median(d_samples), statistics.median(c_samples)


def _dest_mask(experts: torch.Tensor, world: int) -> torch.Tensor:
    """bool ``[L, W]``: token ``t`` goes to rank ``q`` (``q`` owns one of its experts)."""
    owner = expert_owner(experts, EXPERTS, world)
    ranks = torch.arange(world, device=experts.device, dtype=owner.dtype)
    return (owner.unsqueeze(-1) == ranks).any(dim=1)


def _packed(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """uint8 ``[L, 2H + 4K + 4K]``: each token's three dispatch payload rows side by side."""
    parts = (hidden.view(torch.uint8), ids.view(torch.uint8), weights.view(torch.uint8))
    return torch.cat(parts, dim=1)


class _Inputs:
    """One size's inputs on this rank, the combine payload and the references."""

    def __init__(self, rank: int, world: int, tokens: int, gen: torch.Generator):
        dev, h = gen.device, HIDDEN
        self.rank, self.world, self.tokens = rank, world, tokens
        self.hidden = torch.randn(tokens, h, device=dev, dtype=torch.bfloat16, generator=gen)
        scores = torch.rand(tokens, EXPERTS, device=dev, generator=gen)
        self.experts = scores.topk(TOP_K, dim=1).indices.to(torch.int32)  # distinct per token
        logits = torch.rand(tokens, TOP_K, device=dev, generator=gen)
        self.weights = torch.softmax(logits, dim=1)
        self.payloads = [self.hidden, self.experts, self.weights]
        mask = _dest_mask(self.experts, world)
        owners = mask.sum(dim=1, keepdim=True).float()
        # eager checks: the experts return the received hidden row
        self.ref_hidden = (self.hidden.float() * owners).to(torch.bfloat16)
        # graph checks: rank q's payload is q + 1 everywhere
        rank_values = torch.arange(1, world + 1, device=dev, dtype=torch.float32)
        per_token = (mask.float() * rank_values).sum(dim=1, keepdim=True)
        self.ref_const = per_token.expand(tokens, h).to(torch.bfloat16)
        self.row_bytes = sum(p[0].numel() * p.element_size() for p in self.payloads)


class _NcclPadded:
    """The exchange through ``all_to_all_single`` with equal splits: every rank sends ``R``
    rows to every rank, real or padding. Static buffers, no host synchronisation."""

    def __init__(self, x: _Inputs, payload: torch.Tensor):
        w, r, h, n = x.world, x.tokens, HIDDEN, x.tokens
        dev = x.hidden.device
        self.x = x
        self.counts = torch.zeros(w, dtype=torch.int64, device=dev)
        self.recv_counts = torch.zeros(w, dtype=torch.int64, device=dev)
        self.base = torch.arange(w, dtype=torch.int64, device=dev) * r  # [W]: q * R
        self.token_of_pair = torch.arange(n, device=dev).repeat_interleave(w)  # [L * W]
        # slot q * R + j -> token index (n: padding); the last entry takes the pairs not sent
        self.slot_token = torch.full((w * r + 1,), n, dtype=torch.int64, device=dev)
        self.recv = torch.empty(w * r, x.row_bytes, dtype=torch.uint8, device=dev)
        self.payload = payload.view(w * r, h)
        self.back = torch.empty(w * r, h, dtype=torch.bfloat16, device=dev)
        self.acc = torch.empty(n + 1, h, dtype=torch.float32, device=dev)
        self.out = torch.empty(n, h, dtype=torch.bfloat16, device=dev)

    def dispatch(self) -> None:
        x, w, r, n = self.x, self.x.world, self.x.tokens, self.x.tokens
        mask = _dest_mask(x.experts, w)
        self.counts.copy_(mask.sum(dim=0))
        dist.all_to_all_single(self.recv_counts, self.counts)
        pos = mask.cumsum(dim=0) - 1  # token t's place among the tokens going to q
        flat = torch.where(mask, self.base + pos, w * r)
        self.slot_token.fill_(n)
        self.slot_token.scatter_(0, flat.view(-1), self.token_of_pair)
        send = _packed(x.hidden, x.experts, x.weights)[self.slot_token[: w * r].clamp(max=n - 1)]
        dist.all_to_all_single(self.recv, send)

    def combine(self) -> None:
        w, r, n = self.x.world, self.x.tokens, self.x.tokens
        dist.all_to_all_single(self.back, self.payload)
        self.acc.zero_()
        self.acc.index_add_(0, self.slot_token[: w * r], self.back.float())
        self.out.copy_(self.acc[:n])

    def round(self) -> None:
        self.dispatch()
        self.combine()

    def received_hidden(self) -> torch.Tensor:
        """``[W * R, H]`` bf16 view of the received hidden rows."""
        return self.recv[:, : HIDDEN * 2].view(torch.bfloat16)


class _NcclExact:
    """The exchange through ``all_to_all_single`` with the real split sizes (read on the host
    after the counts' exchange): the same rows ours sends. Eager only."""

    def __init__(self, x: _Inputs, payload: torch.Tensor):
        w, h, n = x.world, HIDDEN, x.tokens
        dev = x.hidden.device
        self.x = x
        self.counts = torch.zeros(w, dtype=torch.int64, device=dev)
        self.recv_counts = torch.zeros(w, dtype=torch.int64, device=dev)
        self.payload = payload.view(w * x.tokens, h)
        self.acc = torch.empty(n, h, dtype=torch.float32, device=dev)
        self.out = torch.empty(n, h, dtype=torch.bfloat16, device=dev)
        self.tokens_sent = self.recv = None
        self.send_splits: list[int] = []
        self.recv_splits: list[int] = []

    def dispatch(self) -> None:
        x, w = self.x, self.x.world
        mask = _dest_mask(x.experts, w)
        self.counts.copy_(mask.sum(dim=0))
        dist.all_to_all_single(self.recv_counts, self.counts)
        splits = torch.cat((self.counts, self.recv_counts)).tolist()  # host synchronisation
        self.send_splits, self.recv_splits = splits[:w], splits[w:]
        self.tokens_sent = mask.t().nonzero()[:, 1]  # grouped by destination, ascending tokens
        send = _packed(x.hidden, x.experts, x.weights)[self.tokens_sent]
        self.recv = torch.empty(
            sum(self.recv_splits), x.row_bytes, dtype=torch.uint8, device=send.device
        )
        dist.all_to_all_single(self.recv, send, self.recv_splits, self.send_splits)

    def combine(self) -> None:
        back = torch.empty(
            sum(self.send_splits), HIDDEN, dtype=torch.bfloat16, device=self.payload.device
        )
        rows = self.payload[: sum(self.recv_splits)]
        dist.all_to_all_single(back, rows, self.send_splits, self.recv_splits)
        self.acc.zero_()
        self.acc.index_add_(0, self.tokens_sent, back.float())
        self.out.copy_(self.acc)

    def round(self) -> None:
        self.dispatch()
        self.combine()

    def received_hidden(self) -> torch.Tensor:
        return self.recv[:, : HIDDEN * 2].view(torch.bfloat16)


def _graph_split(dispatch, combine, iters: int) -> tuple[tuple[float, float], tuple]:
    """Dispatch and combine each captured alone, replayed in turn (GPU time only); the times
    and the two graphs."""
    g_dispatch = capture(dispatch, 1, warmup=False)
    g_combine = capture(combine, 1, warmup=False)
    times = _split_us(g_dispatch.replay, g_combine.replay, iters, ahead=True)
    return times, (g_dispatch, g_combine)


def _same(out: torch.Tensor, ref: torch.Tensor) -> bool:
    torch.cuda.synchronize()
    return bool(torch.equal(out, ref))


def _bench_ours(a2a: MoeAlltoAll, x: _Inputs, iters: int) -> tuple[dict, dict]:
    r, h = x.tokens, HIDDEN
    payload = torch.full((x.world, r, h), x.rank + 1, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(r, h, dtype=torch.bfloat16, device="cuda")
    out_ws = torch.empty_like(out)

    def dispatch():
        a2a.dispatch(x.experts, x.payloads, r)

    def combine():
        a2a.combine(payload, r, output=out)

    def round_():
        dispatch()
        combine()

    t, ok = {}, {}
    t["dispatch_eager"], t["combine_eager"] = _split_us(dispatch, combine, iters)
    t["round_eager"] = time_loop(round_, iters)

    g_round = capture(round_, iters)
    t["round_graph"] = time_graph(g_round, iters)
    (t["dispatch_graph"], t["combine_graph"]), (g_d, g_c) = _graph_split(dispatch, combine, iters)

    # The payload written straight into the workspace, as experts would write it: each round
    # fills the region (a pushing combine of another round leaves peers' rows there).
    a2a.dispatch(x.experts, x.payloads, r)
    ws_payload = a2a.get_combine_payload_tensor_in_workspace(r, h, torch.bfloat16)
    ws_payload.fill_(x.rank + 1)
    a2a.combine(ws_payload, r, payload_in_workspace=True, output=out_ws)

    def round_ws():
        a2a.dispatch(x.experts, x.payloads, r)
        ws_payload.fill_(x.rank + 1)
        a2a.combine(ws_payload, r, payload_in_workspace=True, output=out_ws)

    g_ws = capture(round_ws, iters)
    t["round_graph_ws"] = time_graph(g_ws, iters)

    out.zero_()
    g_round.replay()
    ok["graph"] = _same(out, x.ref_const)
    out.zero_()
    g_d.replay()
    g_c.replay()
    ok["graph"] = ok["graph"] and _same(out, x.ref_const)
    out_ws.zero_()
    g_ws.replay()
    ok["graph_ws"] = _same(out_ws, x.ref_const)
    del g_round, g_d, g_c, g_ws

    received = a2a.dispatch(x.experts, x.payloads, r)
    payload.copy_(received[0])  # the "experts" return the received hidden rows
    out.zero_()
    a2a.combine(payload, r, output=out)
    ok["eager"] = _same(out, x.ref_hidden)
    return t, ok


def _bench_nccl_padded(x: _Inputs, iters: int, graphs: bool) -> tuple[dict, dict]:
    payload = torch.full(
        (x.world, x.tokens, HIDDEN), x.rank + 1, dtype=torch.bfloat16, device="cuda"
    )
    nccl = _NcclPadded(x, payload)
    t, ok = {}, {}
    t["dispatch_eager"], t["combine_eager"] = _split_us(nccl.dispatch, nccl.combine, iters)
    t["round_eager"] = time_loop(nccl.round, iters)
    if graphs:
        g_round = capture(nccl.round, iters)
        t["round_graph"] = time_graph(g_round, iters)
        (t["dispatch_graph"], t["combine_graph"]), (g_d, g_c) = _graph_split(
            nccl.dispatch, nccl.combine, iters
        )
        nccl.out.zero_()
        g_round.replay()
        ok["graph"] = _same(nccl.out, x.ref_const)
        nccl.out.zero_()
        g_d.replay()
        g_c.replay()
        ok["graph"] = ok["graph"] and _same(nccl.out, x.ref_const)
        del g_round, g_d, g_c
    nccl.dispatch()
    nccl.payload.copy_(nccl.received_hidden())
    nccl.out.zero_()
    nccl.combine()
    ok["eager"] = _same(nccl.out, x.ref_hidden)
    return t, ok


def _bench_nccl_exact(x: _Inputs, iters: int) -> tuple[dict, dict]:
    payload = torch.full(
        (x.world, x.tokens, HIDDEN), x.rank + 1, dtype=torch.bfloat16, device="cuda"
    )
    nccl = _NcclExact(x, payload)
    t = {}
    t["dispatch_eager"], t["combine_eager"] = _split_us(nccl.dispatch, nccl.combine, iters)
    t["round_eager"] = time_loop(nccl.round, iters)
    nccl.dispatch()
    received = nccl.received_hidden()
    nccl.payload[: received.size(0)].copy_(received)
    nccl.out.zero_()
    nccl.combine()
    return t, {"eager": _same(nccl.out, x.ref_hidden)}


def _mode(column: str) -> str:
    return "graph_ws" if column.endswith("_ws") else column.rsplit("_", 1)[1]


def _agree(times: dict[str, float], ok: dict[str, bool]) -> dict:
    """The slowest rank's times and every rank's verdict; a column whose mode failed its check
    on any rank becomes WRONG."""
    keys, checks = sorted(times), sorted(ok)
    t = torch.tensor([times[k] for k in keys], dtype=torch.float64, device="cuda")
    v = torch.tensor([int(ok[k]) for k in checks], dtype=torch.int32, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    dist.all_reduce(v, op=dist.ReduceOp.MIN)
    passed = dict(zip(checks, (bool(b) for b in v.tolist())))
    cols: dict = {}
    for k, value in zip(keys, t.tolist()):
        cols[k] = value if passed.get(_mode(k), False) else WRONG
    cols["checks"] = {k: ("ok" if p else WRONG) for k, p in passed.items()}
    return cols


def bench_rank(rank: int, world: int, tokens=TOKENS, nccl_graphs: bool = True) -> list[dict]:
    """Every size in ``tokens`` (tokens per rank, ``R = L``) on this rank; rows of
    ``{"tokens", "ours", "nccl_padded", "nccl_exact"}``, each implementation a dict of
    COLUMNS (microseconds, or WRONG) plus ``checks``. ``nccl_graphs=False`` leaves the NCCL
    graph columns out."""
    mapping = Mapping(
        world_size=world, rank=rank, gpus_per_node=world, tp_size=world, moe_ep_size=world
    )
    a2a = MoeAlltoAll(
        mapping, max(tokens), TOP_K, EXPERTS, hidden_size=HIDDEN, timeout_s=_TIMEOUT_S
    )
    gen = torch.Generator(device="cuda").manual_seed(17 + rank)
    rows = []
    try:
        for n in tokens:
            dist.barrier()
            x = _Inputs(rank, world, n, gen)
            iters = _iters(n * (x.row_bytes + HIDDEN * 2))
            row: dict = {"tokens": n, "world": world}
            row["ours"] = _agree(*_bench_ours(a2a, x, iters))
            row["nccl_padded"] = _agree(*_bench_nccl_padded(x, iters, nccl_graphs))
            row["nccl_exact"] = _agree(*_bench_nccl_exact(x, iters))
            rows.append(row)
            torch.cuda.synchronize()
            del x
    finally:
        torch.cuda.synchronize()
        dist.barrier()
        del a2a
        MoeAlltoAll.free_workspaces()
    return rows


def run(world: int, tokens=TOKENS, timeout_s: float = 900.0) -> dict:
    """The section on ``world`` local ranks: ``{"rows": rank 0's rows}``. If that run fails, it
    runs once more without the NCCL graph columns (the likeliest part to hang: collectives
    captured through torch.distributed) and adds ``nccl_graph_error``."""
    from ..testing.dist import run_ranks

    try:
        rows = run_ranks(bench_rank, world, backend="nccl", timeout_s=timeout_s, args=(tokens,))
        return {"rows": rows[0]}
    except Exception as exc:
        first = f"{type(exc).__name__}: {exc}"
    try:
        rows = run_ranks(
            bench_rank, world, backend="nccl", timeout_s=timeout_s, args=(tokens, False)
        )
    except Exception as exc:
        raise RuntimeError(
            f"{type(exc).__name__}: {exc}\n(the first run, with NCCL graphs, failed with: "
            f"{first[-2000:]})"
        ) from exc
    return {"rows": rows[0], "nccl_graph_error": first[-2000:]}


def _cell(cols: dict, column: str) -> str:
    v = cols.get(column)
    if v is None:
        return "-"
    return v if isinstance(v, str) else f"{v:.1f}"


def markdown(result: dict) -> str:
    """One row per (tokens, implementation); then the issue's targets."""
    head = ["tokens/rank", "implementation", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        for key, name in IMPLS:
            cells = [str(r["tokens"]), name, *(_cell(r[key], c) for c, _ in COLUMNS)]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend("- " + line for line in check_targets(result["rows"]))
    if result.get("nccl_graph_error"):
        lines.append(
            "- NCCL padded graph columns left out: the first run failed with "
            + result["nccl_graph_error"].splitlines()[0][:300]
        )
    return "\n".join(lines)


def _value(cols: dict, column: str) -> float | None:
    v = cols.get(column)
    return v if isinstance(v, float) else None


def check_targets(rows: list[dict]) -> list[str]:
    """One line per target of the issue: met or missed, with the measured values."""
    by_tokens = {r["tokens"]: r for r in rows}
    lines = []
    for tokens, limit in TARGETS:
        r = by_tokens.get(tokens)
        if r is None:
            continue
        graph, eager = _value(r["ours"], "round_graph"), _value(r["ours"], "round_eager")
        parts = []
        for mode, v in (("graph", graph), ("eager", eager)):
            if v is None:
                parts.append(f"{mode}: no valid time")
            else:
                verdict = "met" if v <= limit else f"MISSED by {v - limit:.1f} us"
                parts.append(f"{mode} {v:.1f} us {verdict}")
        lines.append(
            f"dispatch+combine <= {limit:g} us at {tokens} tokens/rank: " + "; ".join(parts)
        )
    for mode, nccl_cols in (
        ("graph", (("nccl_padded", "round_graph"),)),
        ("eager", (("nccl_padded", "round_eager"), ("nccl_exact", "round_eager"))),
    ):
        misses, compared = [], 0
        for r in rows:
            ours = _value(r["ours"], f"round_{mode}")
            theirs = [_value(r[k], c) for k, c in nccl_cols]
            theirs = [v for v in theirs if v is not None]
            if ours is None or not theirs:
                continue
            compared += 1
            if ours >= min(theirs):
                misses.append(f"{r['tokens']} ({ours:.1f} vs {min(theirs):.1f})")
        if not compared:
            lines.append(f"faster than NCCL at every size ({mode} round): nothing to compare")
            continue
        verdict = "met" if not misses else "MISSED at " + ", ".join(misses)
        lines.append(
            f"faster than NCCL at every size ({mode} round, against the best NCCL {mode} "
            f"round; {compared} sizes): {verdict}"
        )
    return lines
