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
