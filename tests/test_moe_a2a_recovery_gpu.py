"""MoE all-to-all on GPUs, what a long-running server meets: rounds across the wrap of the flag
value counter, recovery under CUDA graphs, a peer slow to give up before a reset, instances
sharing one workspace, and a busy side stream during the combine.

Inputs are small integers (bf16) and the expert of rank ``q`` computes ``x * (q + 1) + 1``, so
every combined row is an exact sum in fp32 and bf16: outputs compare with ``torch.equal``
against :func:`_expected`, computed from every rank's inputs. Outputs are poisoned (NaN) before
each round, so a round that does nothing is caught.
"""

import pytest
import torch

import fusedcomm as comm
from fusedcomm import Mapping, MoeAlltoAll
from fusedcomm.ops import _moe_a2a_state as _ws_state
from fusedcomm.ops.moe_alltoall import MoeA2AStateError
from fusedcomm.reference.moe_a2a import expert_owner
from fusedcomm.testing.checks import Failures, assert_no_failures
from fusedcomm.testing.dist import barrier, run_ranks

HIDDEN, TOP_K, EXPERTS, TOKENS, MAX_TOKENS = 512, 4, 16, 24, 32
TIMEOUT_S = 20.0  # rounds that must succeed: ranks may time-slice one GPU


def _mapping(rank, world):
    return Mapping(world, rank, tp_size=world, moe_ep_size=world)


def _inputs(rank, seed, tokens=TOKENS):
    g = torch.Generator(device="cuda").manual_seed(seed * 131 + rank)
    keys = torch.rand(tokens, EXPERTS, generator=g, device="cuda")
    experts = keys.argsort(dim=1)[:, :TOP_K].to(torch.int32).contiguous()
    hidden = torch.randint(-8, 9, (tokens, HIDDEN), generator=g, device="cuda").bfloat16()
    return experts, hidden


def _expert(received, rank):
    return (received.float() * (rank + 1) + 1).bfloat16()


def _expected(experts, hidden, world):
    """Per token: the sum over its experts' distinct owners q of hidden * (q + 1) + 1."""
    owner = expert_owner(experts.long(), EXPERTS, world)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for q in range(world):
        sends = (owner == q).any(dim=1, keepdim=True)
        out += sends * (hidden.float() * (q + 1) + 1)
    return out.bfloat16()


def _combine(a2a, received, rank, r, pull, out=None):
    y = _expert(received, rank)
    if pull:
        region = a2a.get_combine_payload_tensor_in_workspace(r, HIDDEN, torch.bfloat16)
        region.copy_(y)
        return a2a.combine(region, r, payload_in_workspace=True, output=out)
    return a2a.combine(y, r, output=out)


def _round(f, what, a2a, rank, world, seed, pull=False, r=TOKENS, tokens=TOKENS):
    """One checked round; returns False (recorded) when it raised a CommFailureError. Waits for
    the current stream only (other streams may still run)."""
    experts, hidden = _inputs(rank, seed, tokens)
    out = torch.full((tokens, HIDDEN), float("nan"), dtype=torch.bfloat16, device="cuda")
    try:
        received = a2a.dispatch(experts, [hidden], r)
        _combine(a2a, received[0], rank, r, pull, out)
        torch.cuda.current_stream().synchronize()
        comm.check_errors(synchronize=False)
    except comm.CommFailureError as e:
        f.check(False, f"{what}: {type(e).__name__}: {e}")
        return False
    f.check(torch.equal(out, _expected(experts, hidden, world)), f"{what}: wrong combine")
    return True


def _set_flag_counter(a2a, rank, value):
    """Every rank's flag value field (offset 0 of its row) to ``value``, then all meet."""
    torch.cuda.synchronize()
    a2a.workspace[rank, 0:4].view(torch.int32).fill_(value)
    torch.cuda.synchronize()
    barrier()


def _flag_counter(a2a, rank):
    return int(a2a.workspace[rank, 0:4].view(torch.int32).item())


# --- the flag value wrap ------------------------------------------------------------------------


def _rank_wrap(rank, world):
    f = Failures()
    a2a = MoeAlltoAll(
        _mapping(rank, world), MAX_TOKENS, TOP_K, EXPERTS, hidden_size=HIDDEN, timeout_s=TIMEOUT_S
    )
    _round(f, "fresh round", a2a, rank, world, 1)
    # Two starts of either parity a few values below the top of the 30-bit field: some push
    # combine of the eight ops after either start takes the largest values the field holds.
    for start in (0x3FFFFFFA, 0x3FFFFFFB):
        a2a.reset()
        _set_flag_counter(a2a, rank, start)
        for i, pull in enumerate((False, False, True, False)):
            if not _round(f, f"start {start:#x} round {i}", a2a, rank, world, 10 + i, pull):
                break
        torch.cuda.synchronize()
        counter = _flag_counter(a2a, rank)
        f.check(0 < counter < 16, f"start {start:#x}: the counter did not wrap ({counter:#x})")
        barrier()
    return f.messages


@pytest.mark.gpu(2)
def test_rounds_across_the_flag_value_wrap(world_size):
    assert_no_failures(run_ranks(_rank_wrap, world_size, backend="nccl", timeout_s=300))


# --- recovery under CUDA graphs -----------------------------------------------------------------


def _fail_a_round(f, a2a, rank, world):
    """Rank 0 dispatches alone and times out; the others raise nothing (their rows hold rank
    0's abort marks). Ends with every rank's device idle."""
    if rank == 0:
        experts, hidden = _inputs(rank, 99)
        error = None
        try:
            a2a.dispatch(experts, [hidden], TOKENS)
            torch.cuda.synchronize()
            comm.check_errors()
        except comm.CommFailureError as e:
            error = e
        f.check(isinstance(error, comm.PeerTimeoutError), f"forced failure: {error!r}")
    barrier()


def _rank_graph_reset(rank, world):
    f = Failures()
    a2a = MoeAlltoAll(_mapping(rank, world), MAX_TOKENS, TOP_K, EXPERTS, hidden_size=HIDDEN,
                      timeout_s=4.0)  # fmt: skip
    experts, hidden = _inputs(rank, 1)
    ids_in, hid_in = experts.clone(), hidden.clone()
    _round(f, "eager warm-up", a2a, rank, world, 2)
    out = torch.empty(TOKENS, HIDDEN, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    barrier()
    with torch.cuda.graph(graph):
        received = a2a.dispatch(ids_in, [hid_in], TOKENS)
        a2a.combine(_expert(received[0], rank), TOKENS, output=out)
    barrier()

    def replay(what, seed):
        experts, hidden = _inputs(rank, seed)
        experts[0, 0] = -1  # one dropped (token, k) pair per replay
        experts[3, 1] = EXPERTS
        ids_in.copy_(experts)
        hid_in.copy_(hidden)
        out.fill_(float("nan"))
        before = comm.moe_a2a_dropped_expert_ids(a2a.workspace, rank)
        barrier()
        graph.replay()
        torch.cuda.synchronize()
        try:
            comm.check_errors()
        except comm.CommFailureError as e:
            f.check(False, f"{what}: {type(e).__name__}: {e}")
        f.check(torch.equal(out, _expected(experts, hidden, world)), f"{what}: wrong combine")
        dropped = comm.moe_a2a_dropped_expert_ids(a2a.workspace, rank) - before
        f.check(dropped == 2, f"{what}: {dropped} dropped pairs counted, expected 2")
        barrier()

    replay("replay before the failure", 3)
    _fail_a_round(f, a2a, rank, world)
    a2a.reset()
    f.check(comm.moe_a2a_dropped_expert_ids(a2a.workspace, rank) == 0, "reset kept the count")
    for i in range(3):
        replay(f"replay {i} after reset()", 4 + i)
    _round(f, "eager round after the replays", a2a, rank, world, 8)
    barrier()
    return f.messages


@pytest.mark.gpu(2)
def test_graph_replays_are_right_after_a_failure_and_reset(world_size):
    assert_no_failures(run_ranks(_rank_graph_reset, world_size, backend="nccl", timeout_s=300))


# --- a peer slow to give up ---------------------------------------------------------------------

SLOW_TIMEOUT_S = 10.0


def _rank_slow_peer(rank, world):
    """The last rank has a long timeout and dispatches alone; every rank calls reset() at once.
    Its kernel gives up (and writes abort marks into every row) only after the others have
    started their reset: reset() must wait for it before zeroing, or the group fails again."""
    f = Failures()
    slow = world - 1
    timeout = SLOW_TIMEOUT_S if rank == slow else 2.0
    a2a = MoeAlltoAll(_mapping(rank, world), MAX_TOKENS, TOP_K, EXPERTS, hidden_size=HIDDEN,
                      timeout_s=timeout)  # fmt: skip
    _round(f, "healthy round", a2a, rank, world, 1)
    barrier()
    if rank == slow:
        experts, hidden = _inputs(rank, 2)
        a2a.dispatch(experts, [hidden], TOKENS)  # nobody else comes: waits SLOW_TIMEOUT_S
    a2a.reset()
    if rank == slow:
        f.check(a2a.phase == "idle", f"phase {a2a.phase!r} after reset()")
    for i in range(3):
        if not _round(f, f"round {i} after reset()", a2a, rank, world, 3 + i, pull=i == 1):
            break
    barrier()
    return f.messages


@pytest.mark.gpu(2)
def test_reset_waits_for_a_peer_slow_to_give_up(world_size):
    assert_no_failures(run_ranks(_rank_slow_peer, world_size, backend="nccl", timeout_s=120))


# --- instances sharing a workspace --------------------------------------------------------------


def _rank_shared(rank, world):
    f = Failures()
    size = MoeAlltoAll.get_moe_workspace_size_per_rank(world, TOP_K, MAX_TOKENS, HIDDEN)
    a = MoeAlltoAll(_mapping(rank, world), MAX_TOKENS, TOP_K, EXPERTS, size, timeout_s=TIMEOUT_S)
    b = MoeAlltoAll(_mapping(rank, world), MAX_TOKENS, TOP_K, EXPERTS, size, timeout_s=TIMEOUT_S)
    f.check(a.workspace is b.workspace, "the two instances do not share the workspace")
    ea, ha = _inputs(rank, 1)
    eb, hb = _inputs(rank, 2)
    received = a.dispatch(ea, [ha], TOKENS)
    try:
        b.dispatch(eb, [hb], TOKENS)
        f.check(False, "a second instance dispatched into a workspace with a round in progress")
    except MoeA2AStateError:
        pass
    out = _combine(a, received[0], rank, TOKENS, pull=False)
    torch.cuda.synchronize()
    comm.check_errors()
    f.check(torch.equal(out, _expected(ea, ha, world)), "instance A's round is wrong")
    _round(f, "instance B's round after A's", b, rank, world, 3)
    _round(f, "instance A's next round", a, rank, world, 4, pull=True)
    barrier()
    return f.messages


@pytest.mark.gpu(2)
def test_instances_sharing_a_workspace_refuse_interleaved_rounds(world_size):
    assert_no_failures(run_ranks(_rank_shared, world_size, backend="nccl", timeout_s=300))


# --- checks of the launch entries ---------------------------------------------------------------


def _rank_checks(rank, world):
    f = Failures()
    a2a = MoeAlltoAll(_mapping(rank, world), MAX_TOKENS, TOP_K, EXPERTS, hidden_size=HIDDEN,
                      timeout_s=TIMEOUT_S)  # fmt: skip
    st = _ws_state._workspaces[(a2a.workspace.data_ptr(), rank)]
    experts, hidden = _inputs(rank, 1)
    received = a2a.dispatch(experts, [hidden], TOKENS)
    # A push-mode payload in the own combine region is read while the peers write there.
    region = a2a.get_combine_payload_tensor_in_workspace(TOKENS, HIDDEN, torch.bfloat16)
    region.copy_(_expert(received[0], rank))
    try:
        a2a.combine(region, TOKENS)
        f.check(False, "a push payload aliasing the own combine region was accepted")
    except ValueError as e:
        f.check("overlaps" in str(e), f"alias: message {e}")
    out = a2a.combine(region, TOKENS, payload_in_workspace=True)
    torch.cuda.synchronize()
    f.check(torch.equal(out, _expected(experts, hidden, world)), "the round after the refusal")
    # A row so wide that W * R * row bytes wraps int64 around to 0 must not pass the bounds
    # check (pull mode: nothing would be pushed); no kernel is launched.
    wide = torch.empty(0, 1 << 60, dtype=torch.bfloat16, device="cuda")
    start = int(a2a.metainfo[8])  # the first byte of the payload data: a valid region start
    try:
        _ws_state._module().moe_a2a_combine_launch(
            wide, st.record, 0, TOP_K, TOKENS, start, 0, False
        )
        f.check(False, "an overflowing combine region passed the bounds check")
    except ValueError as e:
        f.check("does not fit" in str(e), f"overflow: message {e}")
    # The dropped-id counter is 64 bits: start it just below 2**31 and drop 3 pairs per round.
    barrier()
    st.dropped.fill_((1 << 31) - 2)
    for i in range(2):
        experts, hidden = _inputs(rank, 5 + i)
        experts[1, 0], experts[2, 3], experts[5, 2] = -3, EXPERTS, 1 << 20
        received = a2a.dispatch(experts, [hidden], TOKENS)
        out = _combine(a2a, received[0], rank, TOKENS, pull=False)
        torch.cuda.synchronize()
        f.check(torch.equal(out, _expected(experts, hidden, world)), f"dropped round {i}")
    count = comm.moe_a2a_dropped_expert_ids(a2a.workspace, rank)
    f.check(count == (1 << 31) - 2 + 6, f"dropped counter {count}, expected {(1 << 31) + 4}")
    comm.check_errors()
    barrier()
    return f.messages


@pytest.mark.gpu(2)
def test_launch_checks_and_the_64_bit_dropped_counter(world_size):
    assert_no_failures(run_ranks(_rank_checks, world_size, backend="nccl", timeout_s=300))


# --- ranks that disagree on R -------------------------------------------------------------------


def _rank_other_r(rank, world):
    """Rank 0 dispatches with R = TOKENS + 1, the others with TOKENS: every rank raises (no rank
    returns rows placed for another R); after reset() a round with one R is right."""
    f = Failures()
    a2a = MoeAlltoAll(_mapping(rank, world), MAX_TOKENS, TOP_K, EXPERTS, hidden_size=HIDDEN,
                      timeout_s=TIMEOUT_S)  # fmt: skip
    _round(f, "healthy round", a2a, rank, world, 1)
    barrier()
    experts, hidden = _inputs(rank, 2)
    error = None
    try:
        a2a.dispatch(experts, [hidden], TOKENS + 1 if rank == 0 else TOKENS)
        torch.cuda.synchronize()
        comm.check_errors()
    except comm.CommFailureError as e:
        error = e
    f.check(error is not None, "a dispatch whose R differs from a peer's did not raise")
    barrier()
    a2a.reset()
    _round(f, "round after reset()", a2a, rank, world, 3)
    barrier()
    return f.messages, type(error).__name__


@pytest.mark.gpu(2)
def test_ranks_with_another_runtime_max_tokens_raise(world_size):
    results = run_ranks(_rank_other_r, world_size, backend="nccl", timeout_s=300)
    assert_no_failures([messages for messages, _ in results])
    assert "ProtocolMismatchError" in [name for _, name in results], results


# --- a busy side stream -------------------------------------------------------------------------

BIG = 1024  # tokens per rank: the combine grid asks for every block an idle device holds


def _rank_side_stream(rank, world):
    """Kernels on side streams take SM resources for seconds while rounds run: the combine
    must not wait for blocks that cannot be scheduled (it finishes well before the side
    kernels, with a timeout shorter than they run)."""
    f = Failures()
    a2a = MoeAlltoAll(_mapping(rank, world), BIG, TOP_K, EXPERTS, hidden_size=HIDDEN,
                      timeout_s=2.0)  # fmt: skip
    _round(f, "idle device", a2a, rank, world, 1, r=BIG, tokens=BIG)
    barrier()
    sides = [torch.cuda.Stream() for _ in range(8)]
    for s in sides:
        with torch.cuda.stream(s):
            torch.cuda._sleep(12_000_000_000)  # several seconds at any clock
    for i in range(3):
        if not _round(f, f"busy device, round {i}", a2a, rank, world, 2 + i, i == 1, BIG, BIG):
            break
    f.check(not all(s.query() for s in sides), "the side kernels ended first: nothing shown")
    torch.cuda.synchronize()
    barrier()
    return f.messages


@pytest.mark.gpu(2)
def test_combine_runs_beside_kernels_on_other_streams(world_size):
    assert_no_failures(run_ranks(_rank_side_stream, world_size, backend="nccl", timeout_s=300))
