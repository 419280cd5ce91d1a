"""Tests for the host communicators in fusedcomm.runtime.comm_backend."""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from fusedcomm.runtime.comm_backend import (
    CommBackend,
    MnnvlConfig,
    MPIBackend,
    SoloBackend,
    TorchDistBackend,
    allgather_bytes,
    mpi_barrier,
    resolve_backend,
)
from fusedcomm.testing.dist import mpirun_command, run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_SRC = os.path.join(os.path.dirname(HERE), "python")

# Time limits that only stop a hang. Starting CPU ranks or a Python that imports torch takes
# seconds on an idle 2-core machine and several times that on a loaded one (run_ranks counts its
# limit from before the ranks start), and MPI ranks poll while they wait, so they slow each other
# down further when the cores are busy.
RANKS_TIMEOUT_S = 300
SUBPROCESS_TIMEOUT_S = 300


def _env_with_source_path() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PYTHON_SRC, env.get("PYTHONPATH")) if p)
    return env


def _torch_backend_rank(rank, world_size, token):
    comm = TorchDistBackend()
    out = {
        "rank": comm.Get_rank(),
        "size": comm.Get_size(),
        "is_backend": isinstance(comm, CommBackend),
    }
    mine = {"rank": rank, "token": token, "list": list(range(rank + 1))}
    out["gathered"] = comm.allgather(mine)
    out["bytes"] = allgather_bytes(comm, bytes([rank]) * (rank + 3) + token.encode())
    out["bcast"] = comm.bcast({"from": rank, "token": token}, root=1)
    comm.barrier()

    single = comm.Split(rank, 0)
    out["single"] = (single.Get_rank(), single.Get_size(), single.allgather(rank))
    single.barrier()

    rev = comm.Split(0, -rank)
    out["reversed"] = (
        rev.Get_rank(),
        rev.Get_size(),
        rev.allgather(rank),
        rev.bcast(("root0-of-reversed", rank), root=0),
    )
    rev.barrier()
    return out


def test_torch_dist_backend_gloo(world_size):
    n = world_size
    token = os.urandom(6).hex()
    results = run_ranks(
        _torch_backend_rank, n, backend="gloo", timeout_s=RANKS_TIMEOUT_S, args=(token,)
    )
    gathered = [{"rank": r, "token": token, "list": list(range(r + 1))} for r in range(n)]
    as_bytes = [bytes([r]) * (r + 3) + token.encode() for r in range(n)]
    last = n - 1
    expected = [
        {
            "rank": rank,
            "size": n,
            "is_backend": True,
            "gathered": gathered,
            "bytes": as_bytes,
            "bcast": {"from": 1, "token": token},
            "single": (0, 1, [rank]),
            # key = -rank reverses the order: the old last rank is rank 0 of the new group.
            "reversed": (last - rank, n, list(range(last, -1, -1)), ("root0-of-reversed", last)),
        }
        for rank in range(n)
    ]
    assert results == expected  # one comparison: the diff shows every rank's every field


def _nccl_backend_rank(rank, world_size, token):
    import torch

    comm = TorchDistBackend()  # run_ranks already selected CUDA device `rank`
    out = {
        "device": torch.cuda.current_device(),
        "gathered": comm.allgather((rank, token)),
        "bcast": comm.bcast((rank, token), root=1),
    }
    comm.barrier()
    rev = comm.Split(0, -rank)
    single = comm.Split(rank, 0)
    x = torch.full((4,), float(10 * rank + 1), device="cuda")
    dist.all_reduce(x, group=rev.group)
    y = torch.full((4,), float(rank + 5), device="cuda")
    dist.all_reduce(y, group=single.group)
    out["reversed"] = (rev.Get_rank(), rev.allgather(rank), rev.bcast(rank, root=0))
    out["sums"] = (x.tolist(), y.tolist(), single.Get_size())
    return out


@pytest.mark.gpu(2)
@pytest.mark.distinct_gpus  # NCCL itself refuses two ranks on one GPU
def test_torch_dist_backend_nccl(world_size):
    n, last = world_size, world_size - 1
    token = os.urandom(6).hex()
    results = run_ranks(_nccl_backend_rank, n, backend="nccl", timeout_s=180, args=(token,))
    total = float(sum(10 * r + 1 for r in range(n)))  # 12 for two ranks
    expected = [
        {
            "device": rank,
            "gathered": [(r, token) for r in range(n)],
            "bcast": (1, token),
            "reversed": (last - rank, list(range(last, -1, -1)), last),
            "sums": ([total] * 4, [float(rank + 5)] * 4, 1),
        }
        for rank in range(n)
    ]
    assert results == expected


def _sub_group_split_rank(rank, world_size, inner):
    parent_group = dist.new_group(list(range(inner)))  # every rank of the job takes part
    out = None
    if rank < inner:
        parent = TorchDistBackend(parent_group)
        single = parent.Split(rank, 0)
        rev = parent.Split(7, -rank)
        out = (single.Get_size(), single.allgather(rank), rev.Get_rank(), rev.allgather(rank))
    # Whole-job group creation still lines up after the sub-group splits.
    world = TorchDistBackend().Split(0 if rank < inner else 1, 0)
    return out, world.allgather(rank)


def test_torch_dist_backend_split_of_sub_group(world_size):
    # A sub-group of `world_size` ranks plus one rank outside it.
    inner = world_size
    results = run_ranks(
        _sub_group_split_rank, inner + 1, backend="gloo", timeout_s=RANKS_TIMEOUT_S, args=(inner,)
    )
    members = list(range(inner))
    reversed_members = members[::-1]
    expected = [((1, [r], inner - 1 - r, reversed_members), members) for r in range(inner)]
    expected.append((None, [inner]))
    assert results == expected


def test_torch_dist_backend_needs_init():
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    with pytest.raises(
        RuntimeError, match="TorchDistBackend: torch.distributed is not initialised"
    ):
        TorchDistBackend()
    with pytest.raises(RuntimeError, match="not initialised"):
        resolve_backend()


def test_resolve_backend_and_structural_check():
    fake = SoloBackend()
    assert isinstance(fake, CommBackend)
    assert resolve_backend(fake) is fake
    assert allgather_bytes(fake, b"\x01\x02") == [b"\x01\x02"]
    with pytest.raises(TypeError, match="resolve_backend: comm_backend must provide"):
        resolve_backend(object())
    with pytest.raises(TypeError, match="allgather_bytes: data must be bytes, got str"):
        allgather_bytes(fake, "text")


def test_mnnvl_config():
    cfg = MnnvlConfig()
    assert (cfg.comm_backend, cfg.allocation_granularity, cfg.fabric_page_size) == (
        None,
        0,
        1 << 29,
    )
    fake = SoloBackend()
    assert MnnvlConfig(comm_backend=fake, allocation_granularity=1 << 21).comm_backend is fake
    with pytest.raises(TypeError, match="MnnvlConfig: comm_backend"):
        MnnvlConfig(comm_backend="world")
    with pytest.raises(ValueError, match=r"allocation_granularity \(-1\) must be >= 0"):
        MnnvlConfig(allocation_granularity=-1)
    with pytest.raises(ValueError, match=r"fabric_page_size \(0\) must be > 0"):
        MnnvlConfig(fabric_page_size=0)


def test_mpi_backend_without_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    with pytest.raises(ImportError, match="MPIBackend needs mpi4py: pip install mpi4py"):
        MPIBackend()
    with pytest.raises(ImportError, match="MPIBackend needs mpi4py: pip install mpi4py"):
        mpi_barrier()


def test_import_does_not_load_mpi4py():
    code = (
        "import sys, fusedcomm.runtime.comm_backend, fusedcomm.testing.dist; "
        "print('mpi4py' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=_env_with_source_path(),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.mpi
def test_mpi_backend_processes(tmp_path, world_size):
    n, last = world_size, world_size - 1
    script = os.path.join(HERE, "mpi_comm_backend_main.py")
    cmd = mpirun_command(n, [sys.executable, script, str(tmp_path)])
    proc = subprocess.run(
        cmd,
        env=_env_with_source_path(),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    assert sorted(os.listdir(tmp_path)) == sorted(f"rank{r}.json" for r in range(n))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]
    tokens = [r["token"] for r in results]
    expected = [
        {
            "rank": rank,
            "size": n,
            "is_backend": True,
            "raw_is_backend": True,
            "token": tokens[rank],
            "gathered": [{"rank": r, "token": tokens[r]} for r in range(n)],
            "bytes": [bytes([r, 7 * r + 1]).hex() for r in range(n)],
            "bcast": {"from": last, "token": tokens[last]},  # the last rank is the root
            "single": [0, 1, [rank]],
            "reversed": [last - rank, n, list(range(last, -1, -1))],
        }
        for rank in range(n)
    ]
    assert results == expected
