"""Tests for fusedcomm.runtime.cuda_ipc: the CUDA runtime binding and IPC shared buffers."""

import ctypes
import os
import re

import pytest
import torch

from fusedcomm.runtime import cuda_ipc
from fusedcomm.runtime.cuda_ipc import (
    CudaRTLibrary,
    create_shared_buffer,
    cudaIpcMemHandle_t,
    free_shared_buffer,
)
from fusedcomm.testing.checks import Failures, assert_no_failures
from fusedcomm.testing.dist import barrier, rank_device, run_ranks

# ----------------------------------------------------------------------------- CPU


def test_missing_so_file_is_a_clear_error(tmp_path):
    path = str(tmp_path / "libcudart.so.99")
    with pytest.raises(RuntimeError, match="CudaRTLibrary: could not load") as info:
        CudaRTLibrary(so_file=path)
    assert path in str(info.value)


def test_so_file_that_is_not_cudart():
    with pytest.raises(RuntimeError, match=r"has no symbol cudaSetDevice.*libcudart"):
        CudaRTLibrary(so_file="libc.so.6")


def test_so_file_type_is_checked():
    with pytest.raises(TypeError, match="so_file"):
        CudaRTLibrary(so_file=123)


def test_loaded_libraries_reads_maps_lines():
    maps = "\n".join(
        [
            "7f00-7f10 r-xp 00000000 08:01 11 /opt/x/lib/libcudart.so.12",
            "7f10-7f20 r--p 00010000 08:01 11 /opt/x/lib/libcudart.so.12",
            "7f20-7f30 r-xp 00000000 08:01 12 /usr/lib/libc.so.6",
            "7f30-7f40 r-xp 00000000 08:01 13 /tmp/libcudart.so.13 (deleted)",
            "7f40-7f50 rw-p 00000000 00:00 0 ",
            "7f50-7f60 r-xp 00000000 08:01 14 /opt/my dir/libcudart.so.13.0.1",
            "7f60-7f70 r--p 00000000 08:01 15 /opt/libcudart_notes.txt",
        ]
    )
    assert cuda_ipc._loaded_libraries("libcudart", maps) == [
        "/opt/x/lib/libcudart.so.12",
        "/opt/my dir/libcudart.so.13.0.1",
    ]
    assert cuda_ipc._loaded_libraries("libnccl", maps) == []


def test_ipc_handle_is_64_bytes_and_round_trips():
    raw = os.urandom(64)
    handle = cudaIpcMemHandle_t.from_buffer_copy(raw)
    assert ctypes.sizeof(cudaIpcMemHandle_t) == 64
    assert bytes(handle) == raw


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_runtime_without_gpu_reports_cudart_error():
    try:
        lib = CudaRTLibrary()
    except RuntimeError as exc:  # no libcudart anywhere: the message says what to do
        assert "so_file" in str(exc)
        return
    assert CudaRTLibrary().lib is lib.lib  # loaded once per path
    with pytest.raises(RuntimeError, match=r"^CUDART error: .+ \(\d+\) in cudaSetDevice$") as info:
        lib.cudaSetDevice(0)
    # The message carries the runtime's own text for the status it names.
    text, code = re.fullmatch(
        r"CUDART error: (.+) \((\d+)\) in cudaSetDevice", str(info.value)
    ).groups()
    assert int(code) != 0 and text == lib.cudaGetErrorString(int(code))
    with pytest.raises(RuntimeError, match=r"^CUDART error: .+ in cudaMalloc$"):
        lib.cudaMalloc(1024)
    # Codes from cudaError_t (driver_types.h), with the runtime's fixed texts.
    assert lib.cudaGetErrorString(0) == "no error"
    assert lib.cudaGetErrorString(1) == "invalid argument"  # cudaErrorInvalidValue
    assert lib.cudaGetErrorString(100) == "no CUDA-capable device is detected"


@pytest.mark.parametrize(
    "size, exc",
    [
        (0, ValueError),
        (-4096, ValueError),
        (1.5, TypeError),
        ("8", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_create_shared_buffer_rejects_bad_size(size, exc):
    with pytest.raises(exc, match="create_shared_buffer: size_in_bytes"):
        create_shared_buffer(size)


def test_free_unknown_pointers():
    with pytest.raises(ValueError, match=r"free_shared_buffer: pointers \(2 entries\)"):
        free_shared_buffer([0x1000, 0x2000])
    with pytest.raises(TypeError, match="free_shared_buffer: pointers"):
        free_shared_buffer(0x1000)
    with pytest.raises(TypeError, match="free_shared_buffer: pointers"):
        free_shared_buffer(["a", "b"])


# ----------------------------------------------------------------------------- GPU ranks


def _expected(rank, numel, seed):
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    data = torch.randint(-(2**31), 2**31 - 1, (numel,), dtype=torch.int32, generator=gen)
    data[0] = rank  # the row names the rank that wrote it
    return data


def _rank_shared_buffer(rank, world_size, seed, use_backend):

    from fusedcomm.dlpack_utils import pack_strided_memory
    from fusedcomm.runtime.comm_backend import TorchDistBackend

    dev = rank_device().index
    assert torch.cuda.current_device() == dev
    numel = 4096 + 17
    size = numel * 4
    kwargs = {"comm_backend": TorchDistBackend()} if use_backend else {}
    ptrs = create_shared_buffer(size, **kwargs)
    assert len(ptrs) == world_size and all(isinstance(p, int) and p for p in ptrs)
    assert len(set(ptrs)) == world_size

    # Own slot: a strided view over our allocation, filled with rank-tagged data.
    own = pack_strided_memory(ptrs[rank], size, size, 1, torch.int32, dev)
    own.copy_(_expected(rank, numel, seed).view(1, -1).cuda())
    torch.cuda.synchronize()
    barrier()

    lib = cuda_ipc._default_lib()
    failures = Failures()  # every slot is checked, and every wrong one named
    for peer in range(world_size):
        want = _expected(peer, numel, seed)
        # Read through a view over the IPC mapping ...
        view = pack_strided_memory(ptrs[peer], size, size, 1, torch.int32, dev)
        got = view.clone().cpu().view(-1)
        failures.check(torch.equal(got, want), f"view of slot {peer} holds wrong data")
        # ... and through cudaMemcpy into a poisoned local tensor.
        dst = torch.full((numel,), -7, dtype=torch.int32, device="cuda")
        lib.cudaMemcpy(dst.data_ptr(), ptrs[peer], size)
        failures.check(torch.equal(dst.cpu(), want), f"cudaMemcpy of slot {peer} differs")

    # Everyone has checked every slot before anyone overwrites one.
    barrier()
    # Write into the next rank's slot remotely; it checks after the barrier.
    nxt = (rank + 1) % world_size
    remote = torch.randint(
        0,
        1 << 30,
        (numel,),
        dtype=torch.int32,
        generator=torch.Generator().manual_seed(seed + 77 + rank),
    )
    pack_strided_memory(ptrs[nxt], size, size, 1, torch.int32, dev).copy_(remote.view(1, -1))
    torch.cuda.synchronize()
    barrier()
    prev = (rank - 1) % world_size
    from_prev = torch.randint(
        0,
        1 << 30,
        (numel,),
        dtype=torch.int32,
        generator=torch.Generator().manual_seed(seed + 77 + prev),
    )
    failures.check(
        torch.equal(own.cpu().view(-1), from_prev),
        f"own slot does not hold what rank {prev} wrote into it",
    )
    barrier()

    free_shared_buffer(ptrs, **kwargs)
    with pytest.raises(ValueError, match="free_shared_buffer"):
        free_shared_buffer(ptrs)
    return failures.messages


@pytest.mark.gpu(2)
@pytest.mark.parametrize("use_backend", [False, True], ids=["group", "comm_backend"])
def test_shared_buffer_across_ranks(use_backend, world_size):
    seed = int.from_bytes(os.urandom(3), "little")
    per_rank = run_ranks(
        _rank_shared_buffer, world_size, backend="nccl", timeout_s=180, args=(seed, use_backend)
    )
    assert_no_failures(per_rank)


def _rank_create_free_rounds(rank, world_size, rounds, size):

    # Warm up once so lazily created runtime state is not counted as a leak.
    free_shared_buffer(create_shared_buffer(size))
    torch.cuda.synchronize()
    barrier()
    free_before, _ = torch.cuda.mem_get_info()
    for _ in range(rounds):
        ptrs = create_shared_buffer(size)
        assert len(ptrs) == world_size
        free_shared_buffer(ptrs)
    torch.cuda.synchronize()
    barrier()
    free_after, _ = torch.cuda.mem_get_info()
    return free_before - free_after


@pytest.mark.gpu(2)
def test_create_free_rounds_do_not_leak(world_size):
    size = 64 << 20
    lost = run_ranks(
        _rank_create_free_rounds, world_size, backend="nccl", timeout_s=240, args=(10, size)
    )
    # A leak of one round would be at least `size`; allow small driver bookkeeping.
    leaks = {rank: delta for rank, delta in enumerate(lost) if delta >= size // 4}
    assert not leaks, f"device memory lost, bytes by rank: {leaks}"
