"""MoE all-to-all on GPUs: the two combine modes (a payload tensor is pushed to the tokens'
ranks, a payload in the workspace is pulled by them) give the same bits; ranks that disagree on
the mode in one round raise instead of mixing them; MoeAlltoAll.reset() makes a failed
workspace usable again on every rank."""

import pytest
import torch

import fusedcomm as comm
from fusedcomm import Mapping, MoeAlltoAll
from fusedcomm.testing.checks import Failures, assert_no_failures
from fusedcomm.testing.dist import barrier, run_ranks

HIDDEN, TOP_K, EXPERTS, TOKENS = 1024, 4, 16, 40


def _inputs(rank, seed):
    g = torch.Generator(device="cuda").manual_seed(seed * 7 + rank)
    experts = torch.stack(
        [torch.randperm(EXPERTS, generator=g, device="cuda")[:TOP_K] for _ in range(TOKENS)]
    ).int()
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, device="cuda").bfloat16()
    return experts, hidden


def _combine(a2a, received, rank, in_workspace):
    result = (received.float() * (rank + 1) + 0.25).bfloat16()
    if in_workspace:
        region = a2a.get_combine_payload_tensor_in_workspace(TOKENS, HIDDEN, torch.bfloat16)
        region.copy_(result)
        return a2a.combine(region, TOKENS, payload_in_workspace=True)
    return a2a.combine(result, TOKENS)


def _rank_modes(rank, world):
    f = Failures()
    mapping = Mapping(world, rank, tp_size=world, moe_ep_size=world)
    a2a = MoeAlltoAll(mapping, 48, TOP_K, EXPERTS, hidden_size=HIDDEN, timeout_s=2.0)
    experts, hidden = _inputs(rank, 1)
    outs = []
    for in_workspace in (False, True, False):
        received = a2a.dispatch(experts, [hidden], TOKENS)
        outs.append(_combine(a2a, received[0], rank, in_workspace).clone())
    torch.cuda.synchronize()
    comm.check_errors()
    f.check(torch.equal(outs[0], outs[1]), "push and pull combines differ")
    f.check(torch.equal(outs[0], outs[2]), "a repeated push combine differs")

    # Ranks disagree on the mode: every rank raises, none hangs or returns mixed data.
    received = a2a.dispatch(experts, [hidden], TOKENS)
    error = None
    try:
        _combine(a2a, received[0], rank, in_workspace=rank == 0)
        torch.cuda.synchronize()
        comm.check_errors()
    except comm.CommFailureError as e:
        error = e
    f.check(error is not None, "a round with mixed combine modes did not raise")
    torch.cuda.synchronize()
    barrier()

    # Recovery: reset on every rank, then a healthy round gives the first round's bits.
    a2a.reset()
    received = a2a.dispatch(experts, [hidden], TOKENS)
    again = _combine(a2a, received[0], rank, in_workspace=False)
    torch.cuda.synchronize()
    comm.check_errors()
    f.check(torch.equal(again, outs[0]), "the round after reset() differs")
    barrier()
    return f.messages, type(error).__name__


@pytest.mark.gpu(2)
def test_combine_modes_agree_and_mixed_modes_raise(world_size):
    results = run_ranks(_rank_modes, world_size, backend="nccl", timeout_s=180)
    assert_no_failures([messages for messages, _ in results])
    names = [name for _, name in results]
    assert "ProtocolMismatchError" in names, names


# --- EPLB statistics ----------------------------------------------------------------------------


def _rank_eplb(rank, world):
    """Each dispatch gathers every rank's eplb_local_stats into every rank's region; the
    round's combine is unchanged by them (same bits as a round without)."""
    f = Failures()
    mapping = Mapping(world, rank, tp_size=world, moe_ep_size=world)
    a2a = MoeAlltoAll(mapping, 48, TOP_K, EXPERTS, None, HIDDEN, None, EXPERTS, timeout_s=5.0)
    experts, hidden = _inputs(rank, 3)
    received = a2a.dispatch(experts, [hidden], TOKENS)
    plain = _combine(a2a, received[0], rank, in_workspace=False).clone()
    seen = torch.zeros(world, EXPERTS, dtype=torch.int32)
    for i, n in enumerate((EXPERTS, EXPERTS - 5)):  # the second round sends fewer entries
        stats = torch.arange(n, dtype=torch.int32, device="cuda") * 1000 + rank * 10 + i + 1
        received = a2a.dispatch(experts, [hidden], TOKENS, None, None, stats)
        torch.cuda.current_stream().synchronize()
        got = a2a.eplb_gathered_stats.cpu()
        for q in range(world):
            seen[q, :n] = torch.arange(n, dtype=torch.int32) * 1000 + q * 10 + i + 1
        f.check(torch.equal(got, seen), f"round {i}: gathered {got.tolist()}, want {seen.tolist()}")
        out = _combine(a2a, received[0], rank, in_workspace=i == 1)
        torch.cuda.synchronize()
        f.check(torch.equal(out, plain), f"round {i}: the combine differs with EPLB statistics")
    comm.check_errors()
    barrier()
    return f.messages


@pytest.mark.gpu(2)
def test_dispatch_gathers_eplb_statistics(world_size):
    assert_no_failures(run_ranks(_rank_eplb, world_size, backend="nccl", timeout_s=180))
