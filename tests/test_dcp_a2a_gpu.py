"""The DCP all-to-all on GPUs, compared byte for byte with fusedcomm.reference.dcp_a2a.

Two forms. Simulated ranks on one GPU: one plain ``torch.zeros`` workspace, every row
initialised, then each rank's call on its own stream (the kernels of the ranks run at once and
wait only for each other's flags). Processes: the workspace of
``decode_cp_a2a_allocate_mnnvl_workspace`` over peer-mapped rows, one rank per process.

Inputs are fresh random bits (NaNs and infinities included), outputs are poisoned before each
call, and results are compared as integers (``torch.equal`` of bit views), so a byte that is
misrouted, unwritten or converted is caught.
"""

import time

import pytest
import torch

import fusedcomm as comm
from fusedcomm import Mapping
from fusedcomm.reference import dcp_alltoall_reference
from fusedcomm.testing.checks import Failures, assert_no_failures
from fusedcomm.testing.dist import barrier, run_ranks

_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
POISON = 0x5A5A  # a bit pattern no output keeps after a correct call (bar one in 2^16 elements)


def _bits(gen, shape, dtype):
    """Random bits of ``dtype`` (any pattern: NaNs and infinities too), on the GPU."""
    view = _INT_VIEW[dtype]
    info = torch.iinfo(view)
    raw = torch.randint(info.min, info.max, shape, generator=gen, dtype=view, device="cuda")
    return raw.view(dtype)


def _same_bytes(a, b) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.view(_INT_VIEW[a.dtype]), b.view(_INT_VIEW[b.dtype]))
    )


def _poisoned_like(t):
    out = torch.empty_like(t)
    out.view(_INT_VIEW[t.dtype]).fill_(POISON)
    return out


def _inputs(seed, cp, lead, dv, s, dtype):
    """Every rank's (partial_o, softmax_stats): ``[*lead, cp, dv]`` and ``[*lead, cp, s]``."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    po = [_bits(gen, (*lead, cp, dv), dtype) for _ in range(cp)]
    ss = [_bits(gen, (*lead, cp, s), torch.float32) for _ in range(cp)]
    return po, ss


def _check(f, what, po, ss, outs):
    want_o, want_s = dcp_alltoall_reference(po, ss)
    for r, (o, s) in enumerate(outs):
        f.check(_same_bytes(o, want_o[r]), f"{what}: rank {r} partial_o_out differs")
        f.check(_same_bytes(s, want_s[r]), f"{what}: rank {r} softmax_stats_out differs")


# --- simulated ranks on one GPU -------------------------------------------------------------


def _workspace(cp, timeout_s=None):
    size = comm.decode_cp_a2a_workspace_size(cp)
    ws = torch.zeros(cp, size // 8, dtype=torch.int64, device="cuda")
    for r in range(cp):
        comm.decode_cp_a2a_init_workspace(ws, r, cp, timeout_s=timeout_s)
    torch.cuda.synchronize()
    return ws


def _simulate(ws, po, ss, *, poison=True, ranks=None, enable_pdl=None):
    """One call per rank, each on its own stream; returns [(partial_o_out, stats_out)]."""
    cp = len(po)
    ranks = range(cp) if ranks is None else ranks
    streams = {r: torch.cuda.Stream() for r in ranks}
    outs = {}
    for r in ranks:
        streams[r].wait_stream(torch.cuda.current_stream())  # the inputs are made there
        with torch.cuda.stream(streams[r]):
            out = (_poisoned_like(po[r]), _poisoned_like(ss[r])) if poison else None
            got = comm.decode_cp_a2a_alltoall(
                po[r], ss[r], ws, r, cp, enable_pdl=enable_pdl, out=out
            )
            if out is not None:
                assert got[0] is out[0] and got[1] is out[1]
            outs[r] = got
    for s in streams.values():
        s.synchronize()
    torch.cuda.synchronize()
    comm.check_errors()
    return [outs[r] for r in ranks]


@pytest.mark.gpu(1)
@pytest.mark.parametrize("cp", [2, 4, 8])
@pytest.mark.parametrize("batch", [1, 16, 37, 128])
@pytest.mark.parametrize(
    ("dv", "s", "dtype"),
    [(128, 2, torch.bfloat16), (512, 2, torch.bfloat16), (256, 4, torch.float16)],
    ids=["dv128-s2-bf16", "dv512-s2-bf16", "dv256-s4-f16"],
)
def test_simulated_ranks_match_the_reference(cp, batch, dv, s, dtype):
    """Three rounds without re-initialisation, the batch changing between rounds (so the
    channels a call uses change too), with poisoned outputs and with fresh ones."""
    f = Failures()
    ws = _workspace(cp)
    for round_, n in enumerate((batch, max(1, batch // 3), batch)):
        po, ss = _inputs(1000 * cp + 10 * batch + round_, cp, (n,), dv, s, dtype)
        _check(f, f"round {round_} (batch {n})", po, ss, _simulate(ws, po, ss))
    po, ss = _inputs(7 + cp, cp, (batch,), dv, s, dtype)
    _check(
        f, "fresh outputs, no PDL", po, ss, _simulate(ws, po, ss, poison=False, enable_pdl=False)
    )
    f.assert_none()


@pytest.mark.gpu(1)
@pytest.mark.parametrize("cp", [2, 3, 8])
@pytest.mark.parametrize("lead", [(2000,), (4, 333)], ids=["2000", "4x333"])
def test_simulated_ranks_many_rounds_per_channel(cp, lead):
    """Batches larger than one chunk per channel: each channel runs several rounds in a call,
    through both buffers and their acks, repeated."""
    f = Failures()
    ws = _workspace(cp)
    for round_ in range(3):
        po, ss = _inputs(50 + round_ + 10 * cp, cp, lead, 512, 2, torch.bfloat16)
        _check(f, f"round {round_}", po, ss, _simulate(ws, po, ss))
    f.assert_none()


@pytest.mark.gpu(1)
def test_cp_size_1_copies_and_leading_size_0_returns_at_once():
    f = Failures()
    ws = _workspace(1)
    po, ss = _inputs(3, 1, (16,), 128, 2, torch.bfloat16)
    ((o, s),) = _simulate(ws, po, ss)
    f.check(_same_bytes(o, po[0]) and _same_bytes(s, ss[0]), "cp 1 is not a copy")
    # Leading size 0: only rank 0 of a group of 2 calls (nobody to wait for: nothing to send).
    ws = _workspace(2)
    po, ss = _inputs(4, 2, (0,), 128, 2, torch.bfloat16)
    o, s = comm.decode_cp_a2a_alltoall(po[0], ss[0], ws, 0, 2)
    torch.cuda.synchronize()
    f.check(o.shape == po[0].shape and s.shape == ss[0].shape, "empty outputs' shapes")
    # ... and the workspace is as good as before for a real round.
    po, ss = _inputs(5, 2, (9, 3), 128, 2, torch.bfloat16)
    _check(f, "after the empty call", po, ss, _simulate(ws, po, ss))
    f.assert_none()


@pytest.mark.gpu(1)
def test_simulated_ranks_replay_cuda_graphs():
    """Each rank's call captured in its own graph; replays on the ranks' streams with inputs
    changed in place between replays."""
    f = Failures()
    cp, lead = 4, (24,)
    ws = _workspace(cp)
    po, ss = _inputs(11, cp, lead, 128, 2, torch.bfloat16)
    _check(f, "eager warm-up", po, ss, _simulate(ws, po, ss))
    outs = [(_poisoned_like(po[r]), _poisoned_like(ss[r])) for r in range(cp)]
    graphs = [torch.cuda.CUDAGraph() for _ in range(cp)]
    for r in range(cp):
        with torch.cuda.graph(graphs[r]):
            comm.decode_cp_a2a_alltoall(po[r], ss[r], ws, r, cp, out=outs[r])
    streams = [torch.cuda.Stream() for _ in range(cp)]
    for replay in range(3):
        fresh_o, fresh_s = _inputs(20 + replay, cp, lead, 128, 2, torch.bfloat16)
        for r in range(cp):
            po[r].copy_(fresh_o[r])
            ss[r].copy_(fresh_s[r])
            outs[r][0].view(torch.int16).fill_(POISON)
            outs[r][1].view(torch.int32).fill_(POISON)
        torch.cuda.synchronize()
        for r in range(cp):
            with torch.cuda.stream(streams[r]):
                graphs[r].replay()
        torch.cuda.synchronize()
        comm.check_errors()
        _check(f, f"replay {replay}", po, ss, outs)
    f.assert_none()


@pytest.mark.gpu(1)
def test_missing_simulated_rank_times_out_names_the_peer_and_recovers():
    """Rank 1 of 2 never calls: rank 0 raises PeerTimeoutError naming the op and rank 1 within
    the timeout, and is refused afterwards; rank 1's next calls raise too (rank 0 told it).
    Initialising every row again makes the workspace usable."""
    f = Failures()
    ws = _workspace(2, timeout_s=1.0)
    po, ss = _inputs(30, 2, (8,), 128, 2, torch.bfloat16)
    start = time.monotonic()
    comm.decode_cp_a2a_alltoall(po[0], ss[0], ws, 0, 2)
    torch.cuda.synchronize()  # the kernel gives up and returns: it neither hangs nor traps
    waited = time.monotonic() - start
    f.check(waited < 15.0, f"the lonely call took {waited:.1f} s with timeout_s=1")
    with pytest.raises(comm.PeerTimeoutError) as info:
        comm.check_errors()
    error = info.value
    f.check(error.op == "decode_cp_a2a_alltoall", f"op {error.op!r}")
    f.check((error.rank, error.peer) == (0, 1), f"rank {error.rank}, peer {error.peer}")
    f.check("rank 1" in str(error) and "decode_cp_a2a_alltoall" in str(error), str(error))
    with pytest.raises(comm.CommFailureError, match="refused"):
        comm.decode_cp_a2a_alltoall(po[0], ss[0], ws, 0, 2)
    # Rank 1 comes late: its first call completes (rank 0 sent its rows for it before giving
    # up) and must be right; its second call's kernel finds rank 0's abort mark, so its third
    # call raises. (check_errors() would raise rank 0's failure here: one process holds both.)
    late, error = [], None
    for _ in range(3):
        try:
            late.append(comm.decode_cp_a2a_alltoall(po[1], ss[1], ws, 1, 2))
            torch.cuda.synchronize()
        except comm.CommFailureError as e:
            error = e
            break
    want_o, want_s = dcp_alltoall_reference(po, ss)
    f.check(len(late) == 2, f"the late rank completed {len(late)} calls")
    f.check(bool(late) and _same_bytes(late[0][0], want_o[1]), "late rank partial_o_out")
    f.check(bool(late) and _same_bytes(late[0][1], want_s[1]), "late rank stats_out")
    f.check(isinstance(error, comm.PeerAbortedError) and error.peer == 0, f"late: {error!r}")
    ws_again = ws
    for r in range(2):
        comm.decode_cp_a2a_init_workspace(ws_again, r, 2)
    torch.cuda.synchronize()
    po, ss = _inputs(31, 2, (8,), 128, 2, torch.bfloat16)
    _check(f, "after re-initialisation", po, ss, _simulate(ws_again, po, ss))
    f.assert_none()


# --- one rank per process ---------------------------------------------------------------------


def _rank_matrix(rank, world):
    """The mnnvl workspace of the CP group (cp = world; then tp 2 x cp world/2 when world is
    even and >= 4); every rank builds every rank's inputs from the seed to check its own."""
    f = Failures()
    layouts = [(1, world)] + ([(2, world // 2)] if world >= 4 and world % 2 == 0 else [])
    for tp, cp in layouts:
        mapping = Mapping(world, rank, tp_size=tp, cp_size=cp)
        ws = comm.decode_cp_a2a_allocate_mnnvl_workspace(mapping)
        f.check(ws.dtype == torch.int64 and tuple(ws.shape)[0] == cp, f"workspace {ws.shape}")
        f.check(ws.size(1) * 8 == comm.decode_cp_a2a_workspace_size(cp), "row size")
        comm.decode_cp_a2a_init_workspace(ws, mapping.cp_rank, cp, timeout_s=60.0)
        barrier()
        cases = [
            ((1,), 128, torch.bfloat16),
            ((128,), 512, torch.bfloat16),
            ((37,), 256, torch.float16),
            ((3, 700), 512, torch.bfloat16),
            ((0,), 128, torch.bfloat16),
            ((16,), 128, torch.bfloat16),
        ]
        for i, (lead, dv, dtype) in enumerate(cases):
            # The seed depends on the group (tp rank), so groups exchange different data.
            po, ss = _inputs(100 * tp + 10 * i + mapping.tp_rank, cp, lead, dv, 2, dtype)
            me = mapping.cp_rank
            out = (_poisoned_like(po[me]), _poisoned_like(ss[me]))
            o, s = comm.decode_cp_a2a_alltoall(po[me], ss[me], ws, me, cp, out=out)
            torch.cuda.synchronize()
            comm.check_errors()
            want_o, want_s = dcp_alltoall_reference(po, ss)
            what = f"tp {tp} cp {cp} lead {lead} dv {dv} {dtype}"
            f.check(_same_bytes(o, want_o[me]), f"{what}: partial_o_out differs")
            f.check(_same_bytes(s, want_s[me]), f"{what}: softmax_stats_out differs")
        barrier()
    return f.messages


@pytest.mark.gpu(2)
def test_processes_over_peer_memory_match_the_reference(world_size):
    assert_no_failures(run_ranks(_rank_matrix, world_size, backend="nccl", timeout_s=600))


def _rank_missing_peer(rank, world):
    """The last rank skips a call: the others raise within the timeout (never hang)."""
    f = Failures()
    mapping = Mapping(world, rank, cp_size=world)
    ws = comm.decode_cp_a2a_allocate_mnnvl_workspace(mapping)
    comm.decode_cp_a2a_init_workspace(ws, rank, world, timeout_s=2.0)
    barrier()
    po, ss = _inputs(7, world, (8,), 128, 2, torch.bfloat16)
    name = None
    if rank != world - 1:
        start = time.monotonic()
        try:
            comm.decode_cp_a2a_alltoall(po[rank], ss[rank], ws, rank, world)
            torch.cuda.synchronize()
            comm.check_errors()
        except comm.CommFailureError as e:
            name = type(e).__name__
            f.check(e.op == "decode_cp_a2a_alltoall", f"op {e.op!r}")
        waited = time.monotonic() - start
        f.check(name is not None, "no CommFailureError after a lost peer")
        f.check(waited < 20.0, f"the call took {waited:.1f} s with timeout_s=2")
    barrier()
    return f.messages, name


@pytest.mark.gpu(2)
def test_missing_peer_raises_instead_of_hanging(world_size):
    results = run_ranks(_rank_missing_peer, world_size, backend="nccl", timeout_s=300)
    assert_no_failures([messages for messages, _ in results])
    names = [name for _, name in results]
    assert "PeerTimeoutError" in names[:-1], names


@pytest.mark.gpu(1)
def test_torch_compile_traces_the_op():
    """The frontend inside a compiled function (cp 1: no peer to run beside it) gives the
    eager result, through the registered op."""
    ws = _workspace(1)
    po, ss = _inputs(40, 1, (6,), 128, 2, torch.bfloat16)

    def exchange(o, s):
        x, y = comm.decode_cp_a2a_alltoall(o, s, ws, 0, 1, enable_pdl=True)
        return x.view(torch.int16).clone(), y.view(torch.int32).clone()

    torch._dynamo.reset()
    compiled = torch.compile(exchange, fullgraph=True, backend="aot_eager")
    x, y = compiled(po[0], ss[0])
    torch.cuda.synchronize()
    assert torch.equal(x, po[0].view(torch.int16)) and torch.equal(y, ss[0].view(torch.int32))
