"""MoE all-to-all rounds without some ranks (active_rank_mask) on GPUs.

The last rank sits out (it calls nothing, as a rank that is gone): the others run rounds with a
mask without it, after a full round left its recv counts and rows in their workspaces. Their
combine equals the reference of the routing without the excluded rank's experts, the received
expert ids of the excluded source are all padding after sanitize, and after re-initialisation
on every rank (reset) a full round works again. Ranks of a round that disagree on the mask fail
on every rank (at least three ranks: two that include each other with different masks).
With two ranks sharing one GPU, rank 0 runs the masked rounds alone.
"""

import pytest
import torch

import fusedcomm as comm
from fusedcomm import Mapping, MoeAlltoAll
from fusedcomm.reference.moe_a2a import combine_sum, dispatch_reference, expert_owner
from fusedcomm.testing.checks import Failures, assert_no_failures
from fusedcomm.testing.dist import barrier, run_ranks

MAX_TOKENS, TOP_K, EXPERTS, HIDDEN, TOKENS = 64, 4, 16, 1024, 40
INVALID = -3


def _inputs(seed, rank):
    g = torch.Generator(device="cuda").manual_seed(seed * 100 + rank)
    keys = torch.rand(TOKENS, EXPERTS, generator=g, device="cuda")
    experts = keys.argsort(dim=1)[:, :TOP_K].to(torch.int32).contiguous()
    x = torch.randn(TOKENS, HIDDEN, generator=g, device="cuda").bfloat16()
    return experts, x


def _expert(x, q):
    return (x.float() * (q + 1) + 0.125 * (q + 1)).bfloat16()


def _reference(seed, rank, world, active):
    """This rank's combine when only `active` ranks take part: experts of the other ranks
    are not routed (given to the dispatch reference as invalid ids)."""
    inputs = [_inputs(seed, q) for q in range(world)]
    routed = []
    for experts, x in inputs:
        owner = expert_owner(experts, EXPERTS, world)
        keep = torch.zeros_like(owner, dtype=torch.bool)
        for q in active:
            keep |= owner == q
        routed.append((torch.where(keep, experts, torch.full_like(experts, -1)), x))
    ref = dispatch_reference([e for e, _ in routed], [[x] for _, x in routed], EXPERTS, TOKENS)
    targets, x = ref.target_ranks[rank], inputs[rank][1]
    terms = []
    for k in range(TOP_K):
        rows = torch.zeros(x.shape, dtype=torch.float32, device="cuda")
        for q in active:
            pick = targets[:, k] == q
            rows[pick] = _expert(x[pick], q).float()
        terms.append(rows)
    return combine_sum(terms).bfloat16()


def _round(a2a, seed, rank, in_workspace=False, mask=None):
    experts, x = _inputs(seed, rank)
    received = a2a.dispatch(experts, [experts, x], TOKENS, INVALID, 0, None, mask)
    y = _expert(received[1], rank)
    if in_workspace:
        y = a2a.get_combine_payload_tensor_in_workspace(TOKENS, HIDDEN, torch.bfloat16).copy_(y)
    out = a2a.combine(y, TOKENS, in_workspace, active_rank_mask=mask)
    return out, received[0].clone()


def _rank_masked(rank, world):
    f = Failures()
    mapping = Mapping(world, rank, tp_size=world, moe_ep_size=world)
    a2a = MoeAlltoAll(mapping, MAX_TOKENS, TOP_K, EXPERTS, None, HIDDEN, None, 0, True,
                      timeout_s=20.0)  # fmt: skip
    everyone, gone = list(range(world)), world - 1
    active = everyone[:-1]
    out, _ = _round(a2a, 1, rank)
    f.check(torch.equal(out, _reference(1, rank, world, everyone)), "full round")
    torch.cuda.synchronize()
    barrier()
    if rank != gone:
        mask = comm.moe_a2a_active_rank_mask(active, world)
        for i, in_workspace in enumerate((False, True, False)):
            out, ids = _round(a2a, 2 + i, rank, in_workspace, mask)
            torch.cuda.synchronize()
            what = f"masked round {i} (in_workspace={in_workspace})"
            want = _reference(2 + i, rank, world, active)
            if not torch.equal(out, want):
                f.check(False, f"{what}: {int((out != want).sum())} elements differ")
            f.check(bool((ids[gone] == INVALID).all()), f"{what}: rows of the excluded source")
        comm.check_errors()
    torch.cuda.synchronize()
    barrier()
    a2a.reset()  # the excluded rank comes back: every rank re-initialises
    out, _ = _round(a2a, 9, rank)
    torch.cuda.synchronize()
    comm.check_errors()
    f.check(torch.equal(out, _reference(9, rank, world, everyone)), "full round after reset()")
    barrier()
    return f.messages


@pytest.mark.gpu(2)
def test_rounds_without_the_last_rank(world_size):
    assert_no_failures(run_ranks(_rank_masked, world_size, backend="nccl", timeout_s=240))


def _rank_disagree(rank, world):
    """Rank 0 runs with every rank, the others without the last: ranks 0 and 1 include each
    other with different masks."""
    f = Failures()
    mapping = Mapping(world, rank, tp_size=world, moe_ep_size=world)
    a2a = MoeAlltoAll(mapping, MAX_TOKENS, TOP_K, EXPERTS, None, HIDDEN, None, 0, True,
                      timeout_s=5.0)  # fmt: skip
    everyone = list(range(world))
    mask = everyone if rank in (0, world - 1) else everyone[:-1]
    error = None
    try:
        _round(a2a, 4, rank, mask=comm.moe_a2a_active_rank_mask(mask, world))
        torch.cuda.synchronize()
        comm.check_errors()
    except comm.CommFailureError as e:
        error = e
    f.check(error is not None, "a round with disagreeing masks did not raise")
    torch.cuda.synchronize()
    barrier()
    a2a.reset()
    out, _ = _round(a2a, 5, rank)
    torch.cuda.synchronize()
    comm.check_errors()
    f.check(torch.equal(out, _reference(5, rank, world, everyone)), "the round after reset()")
    barrier()
    return f.messages, type(error).__name__


@pytest.mark.gpu(3)
def test_ranks_that_disagree_on_the_mask_fail(world_size):
    world = max(3, world_size)  # two ranks that include each other with different masks
    results = run_ranks(_rank_disagree, world, backend="nccl", timeout_s=180)
    assert_no_failures([messages for messages, _ in results])
    names = [name for _, name in results]
    assert "ProtocolMismatchError" in names, names
