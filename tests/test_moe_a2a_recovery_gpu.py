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


def _round(f, what, a2a, rank, world, seed, pull=False, r=TOKENS):
    """One checked round; returns False (recorded) when it raised a CommFailureError."""
    experts, hidden = _inputs(rank, seed)
    out = torch.full((TOKENS, HIDDEN), float("nan"), dtype=torch.bfloat16, device="cuda")
    try:
        received = a2a.dispatch(experts, [hidden], r)
        _combine(a2a, received[0], rank, r, pull, out)
        torch.cuda.synchronize()
        comm.check_errors()
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
    # Two starts of either parity a few values below the top of the 31-bit field: some push
    # combine of the eight ops after either start takes the largest values the field holds.
    for start in (0x7FFFFFFA, 0x7FFFFFFB):
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
