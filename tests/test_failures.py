"""The failure protocol on GPUs: a failure is seen by every rank and never becomes a wrong result.

See docs/failure-protocol.md. Each scenario makes one rank late, absent, dead or out of step and
checks every rank: it either completes with the right data or raises (at the call or at
check_errors()), and a healthy communicator beside the failed one keeps working.
"""

import os
import signal
import time

import pytest
import torch

import fusedcomm as comm
from fusedcomm.ops import vllm_ar
from fusedcomm.testing.dist import all_reduce, barrier, run_ranks
from fusedcomm.testing.vllm_comm import VllmComm

N = 4096  # fp32 elements: 16 KiB, two blocks


def _full(value, n=N):
    return torch.full((n,), float(value), device="cuda", dtype=torch.float32)


def _raises_comm_failure():
    try:
        comm.check_errors()
    except comm.CommFailureError as e:
        return e
    return None


def _rank_late_peer(rank, world, algorithm):
    """Rank 0 queues two calls (1, then 100) and gives up on the first; the others arrive 2 s
    late with 10. They must never see the second call's data, and every rank must raise."""
    c = VllmComm(1 << 20, timeout_s=0.5)
    if rank == 0:
        outs = [
            c.all_reduce(_full(1), algorithm=algorithm),
            c.all_reduce(_full(100), algorithm=algorithm),
        ]
        torch.cuda.synchronize()
        with pytest.raises(comm.PeerTimeoutError, match="did not arrive within 0.5 s"):
            comm.check_errors()
        with pytest.raises(comm.PeerTimeoutError, match="refused on every rank"):
            c.all_reduce(_full(1), algorithm=algorithm)
        del outs
    else:
        time.sleep(2.0)
        out = c.all_reduce(_full(10), algorithm=algorithm)
        torch.cuda.synchronize()
        error = _raises_comm_failure()
        wrong = 100 + 10 * (world - 1)
        assert not torch.any(out == wrong), "a late rank computed on the next call's data"
        assert error is not None, f"rank {rank} got no error (out[0] = {out[0].item()})"
        assert isinstance(error, comm.PeerAbortedError) and error.peer == 0, repr(error)
    barrier()
    c.close()


@pytest.mark.gpu(2)
@pytest.mark.parametrize("algorithm", ["oneshot", "twoshot"])
def test_late_peer_never_sees_a_wrong_result(world_size, algorithm):
    run_ranks(_rank_late_peer, world_size, backend="nccl", timeout_s=120, args=(algorithm,))


def _rank_second_communicator(rank, world):
    """Handle A fails on rank 0 (the others never join it); handle B keeps working."""
    a = VllmComm(1 << 20, timeout_s=0.5)
    b = VllmComm(1 << 20, timeout_s=10.0)
    gen = torch.Generator(device="cuda").manual_seed(1234 + rank)
    if rank == 0:
        a.all_reduce(_full(1))
        torch.cuda.synchronize()
        assert vllm_ar._handles[a.fa].failure.failed()
    barrier()
    for _ in range(3):
        x = torch.randint(-64, 64, (N,), device="cuda", generator=gen).float()
        out = torch.full_like(x, float("nan"))
        b.all_reduce(x, out)
        ref = x.clone()
        all_reduce(ref)
        torch.cuda.synchronize()
        assert torch.equal(out, ref)
    assert not vllm_ar._handles[b.fa].failure.failed()
    if rank == 0:
        with pytest.raises(comm.PeerTimeoutError):
            comm.check_errors()
    barrier()
    a.close()
    b.close()


@pytest.mark.gpu(2)
def test_failure_on_one_handle_leaves_another_working(world_size):
    run_ranks(_rank_second_communicator, world_size, backend="nccl", timeout_s=120)


def _rank_mismatch(rank, world):
    """Rank 0 runs one-shot, the others two-shot: a clear error, not a hang or a wrong sum."""
    c = VllmComm(1 << 20, timeout_s=5.0)
    out = c.all_reduce(_full(rank + 1), algorithm="oneshot" if rank == 0 else "twoshot")
    torch.cuda.synchronize()
    error = _raises_comm_failure()
    assert isinstance(error, (comm.ProtocolMismatchError, comm.PeerAbortedError)), repr(error)
    del out
    barrier()
    c.close()
    return type(error).__name__


@pytest.mark.gpu(2)
def test_algorithm_mismatch_is_reported(world_size):
    names = run_ranks(_rank_mismatch, world_size, backend="nccl", timeout_s=120)
    assert "ProtocolMismatchError" in names


def _rank_dies_mid_call(rank, world):
    """The last rank launches a call and is killed; the others raise within the timeout."""
    c = VllmComm(1 << 22, timeout_s=2.0)
    x = _full(rank + 1, n=1 << 20)
    barrier()
    if rank == world - 1:
        c.all_reduce(x)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    start = time.monotonic()
    c.all_reduce(x)
    torch.cuda.synchronize()
    elapsed = time.monotonic() - start
    error = _raises_comm_failure()
    assert error is not None and elapsed < 2.0 + 3.0, (error, elapsed)
    assert torch.ones(4, device="cuda").sum().item() == 4.0  # the context is still usable
    return elapsed


@pytest.mark.gpu(2)
def test_dead_peer_raises_within_the_timeout(world_size):
    values = run_ranks(
        _rank_dies_mid_call, world_size, backend="nccl", timeout_s=120, may_die=(world_size - 1,)
    )
    assert all(v < 5.0 for v in values[:-1])


def _rank_graph_replay_learns(rank, world):
    """A serving loop replaying a graph learns of a failure from the cheap check."""
    c = VllmComm(1 << 20, timeout_s=1.0)
    x = _full(rank + 1)
    out = torch.empty_like(x)
    c.all_reduce(x)  # eager warm-up: loads the kernels before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        vllm_ar.vllm_all_reduce(c.fa, x, out, 0, 0, 36)
    c.register_graph_inputs()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.all(out == world * (world + 1) / 2)
    comm.check_errors(synchronize=False)
    barrier()
    if rank == 0:
        graph.replay()  # alone: the others stopped serving
        time.sleep(1.5)  # no device sync: the record is in pinned host memory
        with pytest.raises(comm.PeerTimeoutError):
            comm.check_errors(synchronize=False)
    barrier()
    torch.cuda.synchronize()
    del graph
    c.close()


@pytest.mark.gpu(2)
def test_graph_replay_failure_seen_without_sync(world_size):
    run_ranks(_rank_graph_replay_learns, world_size, backend="nccl", timeout_s=120)


@pytest.mark.gpu(1)
def test_check_errors_refuses_to_sync_during_capture():
    graph = torch.cuda.CUDAGraph()
    x = torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError, match="cannot synchronise while a CUDA graph"):
        with torch.cuda.graph(graph):
            x.add_(1)
            comm.check_errors()
    comm.check_errors(synchronize=False)  # the cheap form is allowed anywhere
