"""Tests for the multi-rank launcher fusedcomm.testing.dist.run_ranks."""

import os
import re
import time

import pytest

from fusedcomm.testing import dist as dist_mod
from fusedcomm.testing.dist import RankFailure, RankTimeout, mpirun_command, run_ranks

# run_ranks's time limit counts from before the ranks start, and starting them (a spawned
# interpreter each that imports torch, then the gloo rendezvous) takes about 6 s for two ranks on
# an idle 2-core machine and over 20 s on a loaded one. Limits that only stop a hang are generous.
RANKS_TIMEOUT_S = 300


def _report_rank(rank, world_size, offset):
    import torch
    import torch.distributed as dist

    value = torch.tensor([rank + offset], dtype=torch.int64)
    dist.all_reduce(value)
    env = {
        k: os.environ.get(k)
        for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "FUSEDCOMM_TEST_TAG")
    }
    return {
        "rank": rank,
        "world": world_size,
        "dist_rank": dist.get_rank(),
        "sum": int(value.item()),
        "env": env,
    }


def test_returns_values_by_rank(world_size):
    n = world_size
    offset = int.from_bytes(os.urandom(2), "little")
    results = run_ranks(
        _report_rank,
        n,
        timeout_s=RANKS_TIMEOUT_S,
        args=(offset,),
        env={"FUSEDCOMM_TEST_TAG": "tag"},
    )
    env = {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "FUSEDCOMM_TEST_TAG": "tag",
    }
    total = n * offset + n * (n - 1) // 2
    assert results == [
        {"rank": r, "world": n, "dist_rank": r, "sum": total, "env": env} for r in range(n)
    ]


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        # when it failed, on CLOCK_MONOTONIC: one clock for every process, the parent's too
        raise ValueError(f"deliberate failure on rank one at {time.monotonic():.3f}")
    time.sleep(600)  # left running; the launcher must stop it


def test_failing_rank_raises_rank_failure(world_size):
    with pytest.raises(RankFailure) as info:
        run_ranks(_fail_on_rank_one, world_size, timeout_s=RANKS_TIMEOUT_S)
    raised = time.monotonic()
    assert info.value.ranks == [1]
    text = str(info.value)
    assert "rank 1 failed" in text
    failed = re.search(r"ValueError: deliberate failure on rank one at (\d+\.\d+)", text)
    assert failed, text
    assert "_fail_on_rank_one" in text  # the traceback comes through
    # Raised soon after the failure (timed from the failure itself, so slow rank start-up on a
    # loaded machine does not count), not at the time limit or when rank 0's sleep ends.
    assert raised - float(failed.group(1)) < 30


def _die_on_rank_zero(rank, world_size):
    if rank == 0:
        os._exit(3)
    time.sleep(600)


def test_dead_rank_raises_rank_failure(world_size):
    with pytest.raises(RankFailure) as info:
        run_ranks(_die_on_rank_zero, world_size, timeout_s=RANKS_TIMEOUT_S)
    assert info.value.ranks == [0]
    assert "exited with code 3 before reporting" in str(info.value)


def _hang_on_rank_one(rank, world_size):
    if rank == 1:
        while True:
            time.sleep(1)
    return rank


def test_hung_rank_raises_rank_timeout(world_size):
    # Rank 0 must start and report within the limit for the timeout to name rank 1 alone.
    # Starting two ranks took 12 s on a 2-core machine with three busy processes beside them
    # and up to 60 s with six and another test run (20 s was too short there).
    timeout_s = 90
    start = time.monotonic()
    with pytest.raises(RankTimeout) as info:
        run_ranks(_hang_on_rank_one, world_size, timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    assert timeout_s <= elapsed < timeout_s + 30
    assert info.value.ranks == [1]
    assert "rank 1 still running" in str(info.value)


def test_timeout_cap_from_the_environment(monkeypatch):
    monkeypatch.delenv(dist_mod.MAX_TIMEOUT_ENV, raising=False)
    assert dist_mod._timeout_cap() == float("inf")
    monkeypatch.setenv(dist_mod.MAX_TIMEOUT_ENV, "75.5")
    assert dist_mod._timeout_cap() == 75.5
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(dist_mod.MAX_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=dist_mod.MAX_TIMEOUT_ENV):
            run_ranks(_report_rank, 1, args=(0,))


def test_rejects_multicast_override():
    with pytest.raises(ValueError, match="NCCL_NVLS_ENABLE"):
        run_ranks(_report_rank, 1, args=(0,), env={"NCCL_NVLS_ENABLE": "1"})


def test_mpirun_command_flags(monkeypatch):
    monkeypatch.setattr(dist_mod, "find_mpirun", lambda: "/opt/mpi/bin/mpirun")
    monkeypatch.setattr(dist_mod.os, "geteuid", lambda: 0)
    monkeypatch.setattr(dist_mod, "_is_open_mpi", lambda launcher: True)
    assert mpirun_command(2, ["python", "x.py"]) == [
        "/opt/mpi/bin/mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        "2",
        "python",
        "x.py",
    ]
    monkeypatch.setattr(dist_mod, "_is_open_mpi", lambda launcher: False)
    assert mpirun_command(3, ["a"]) == ["/opt/mpi/bin/mpirun", "-n", "3", "a"]
    monkeypatch.setattr(dist_mod, "find_mpirun", lambda: None)
    with pytest.raises(FileNotFoundError, match="mpirun_command: no mpiexec or mpirun"):
        mpirun_command(2, ["a"])


def test_gpu_placement_spreads_ranks_and_shares_where_gpus_run_out(monkeypatch):
    monkeypatch.delenv(dist_mod.SHARE_GPU_ENV, raising=False)
    assert dist_mod.gpu_placement(2, visible=2) == (0, 1)
    assert dist_mod.gpu_placement(4, visible=2) == (0, 1, 0, 1)
    assert dist_mod.gpu_placement(2, visible=1) == (0, 0)
    assert not dist_mod.ranks_share_gpu(2, visible=8)
    assert dist_mod.ranks_share_gpu(3, visible=2)
    monkeypatch.setenv(dist_mod.SHARE_GPU_ENV, "1")
    assert dist_mod.gpu_placement(3, visible=8) == (0, 0, 0)
    assert dist_mod.ranks_share_gpu(2, visible=8)
    with pytest.raises(RuntimeError, match="need a visible CUDA device"):
        dist_mod.gpu_placement(2, visible=0)


def test_rank_device_outside_a_gpu_rank_raises(monkeypatch):
    monkeypatch.delenv("FUSEDCOMM_TEST_RANK_DEVICE", raising=False)
    with pytest.raises(RuntimeError, match="not inside a GPU rank"):
        dist_mod.rank_device()


def _host_collectives(rank, world_size):
    import torch

    x = torch.tensor([float(rank + 1)])
    dist_mod.all_reduce(x)
    parts = dist_mod.gather_all(torch.tensor([rank, 10 * rank]))
    dist_mod.barrier()
    return x.item(), [p.tolist() for p in parts]


def test_collective_helpers_on_cpu_tensors(world_size):
    results = run_ranks(_host_collectives, world_size, timeout_s=120)
    total = float(world_size * (world_size + 1) // 2)
    want = [[r, 10 * r] for r in range(world_size)]
    assert results == [(total, want)] * world_size


class _Item:
    """Just enough of a pytest item for the conftest skip rule."""

    def __init__(self, *marks, fixtures=("world_size",)):
        self.marks = {m.name: m for m in marks}
        self.fixturenames = fixtures

    def get_closest_marker(self, name):
        return self.marks.get(name)


def test_skip_rule_counts_ranks_not_gpus(monkeypatch):
    import conftest

    monkeypatch.delenv(dist_mod.SHARE_GPU_ENV, raising=False)
    multi = _Item(pytest.mark.gpu(2).mark)
    distinct = _Item(pytest.mark.gpu(2).mark, pytest.mark.distinct_gpus.mark)
    assert conftest.skip_reason(multi, 2, 1) is None  # two ranks share the one GPU
    assert conftest.skip_reason(multi, 8, 1) is None
    assert "none visible" in conftest.skip_reason(multi, 2, 0)
    assert "distinct GPUs" in conftest.skip_reason(distinct, 2, 1)
    assert conftest.skip_reason(distinct, 2, 2) is None
    monkeypatch.setenv(dist_mod.SHARE_GPU_ENV, "1")
    assert "forced to share" in conftest.skip_reason(distinct, 2, 2)
    assert conftest.skip_reason(_Item(), 2, 0) is None  # no gpu marker: not a GPU test
