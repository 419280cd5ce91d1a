"""Foundation benchmark: the IPC shared-buffer exchange and Lamport initialisation."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from ..ops.lamport import trtllm_lamport_initialize
from ..runtime.cuda_ipc import create_shared_buffer, free_shared_buffer
from .timing import time_loop


def bench_rank(rank: int, world: int) -> dict:
    out: dict = {"world": world}
    samples = []
    for _ in range(5):
        dist.barrier()
        start = time.perf_counter()
        ptrs = create_shared_buffer(64 << 20)
        samples.append((time.perf_counter() - start) * 1e3)
        free_shared_buffer(ptrs)
    out["create_shared_buffer_64MiB_ms"] = statistics.median(samples)
    buf = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    n = (64 << 20) // 2
    out["lamport_init_64MiB_us"] = time_loop(
        lambda: trtllm_lamport_initialize(buf.data_ptr(), n, torch.bfloat16), 20
    )
    out["lamport_init_GBps"] = (64 << 20) / (out["lamport_init_64MiB_us"] * 1e3)
    torch.cuda.synchronize()
    out["lamport_ok"] = bool(torch.all(buf.view(torch.int16) == -32768))
    return out


def cpu_rendezvous_rank(rank: int, world: int) -> dict:
    """What runs without GPUs: the gloo rendezvous our buffer exchange is built on."""
    from ..runtime.comm_backend import TorchDistBackend

    backend = TorchDistBackend()
    payload = bytes(64)  # the size of one CUDA IPC handle
    samples = []
    for _ in range(20):
        start = time.perf_counter()
        backend.allgather(payload)
        backend.barrier()
        samples.append((time.perf_counter() - start) * 1e6)
    return {"world": world, "allgather_64B_plus_barrier_us": statistics.median(samples)}
