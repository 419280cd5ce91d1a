"""Lamport buffer initialisation: fill buffers with negative zero, the 'not yet written' mark."""

from __future__ import annotations

import torch

from ..jit import load_module
from ..runtime.cuda_ipc import require_cuda
from ._register import register_op, tracing

_ELEM_BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


def _elem_bytes(op: str, dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{op}: dtype must be a torch.dtype, got {type(dtype).__name__}")
    try:
        return _ELEM_BYTES[dtype]
    except KeyError:
        raise TypeError(
            f"{op}: dtype {dtype} is not supported (float16, bfloat16, float32)"
        ) from None


def _check_int(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    return value


def _fill(op: str, ptr: int, num_bytes: int, elem_bytes: int) -> None:
    _check_int(op, "buffer pointer", ptr)
    if ptr == 0 or ptr % 16:
        raise ValueError(f"{op}: buffer pointer ({ptr:#x}) must be non-null and 16-byte aligned")
    device = torch.cuda.current_device()
    stream = torch.cuda.current_stream(device).cuda_stream
    load_module("lamport").lamport_initialize(ptr, num_bytes, elem_bytes, device, stream)


def _lamport_initialize_impl(buffer_ptr: int, size: int, dtype_bytes: int) -> None:
    _fill("trtllm_lamport_initialize", buffer_ptr, size * dtype_bytes, dtype_bytes)


register_op(
    "trtllm_lamport_initialize(int buffer_ptr, int size, int dtype_bytes) -> ()",
    _lamport_initialize_impl,
)


def trtllm_lamport_initialize(buffer_ptr: int, size: int, dtype: torch.dtype) -> None:
    """Mark ``size`` elements of ``dtype`` at ``buffer_ptr`` as empty (negative zero).

    Runs on the current CUDA stream of the current device. Exactly ``size`` elements are
    written, also when that is not a multiple of 16 bytes (nothing past the end is touched).
    """
    op = "trtllm_lamport_initialize"
    elem = _elem_bytes(op, dtype)
    if _check_int(op, "size", size) < 0:
        raise ValueError(f"{op}: size ({size}) must be >= 0")
    if tracing():
        # A raw pointer gives torch.compile nothing to order the fill with, so a compiled graph
        # could drop or reorder it: refuse rather than silently skip it.
        raise NotImplementedError(
            f"{op}: call it outside torch.compile regions (setup code); "
            "it fills raw device memory that the graph cannot see"
        )
    require_cuda(op)
    _lamport_initialize_impl(buffer_ptr, size, elem)


def trtllm_lamport_initialize_all(
    buffer_0_ptr: int, buffer_1_ptr: int, buffer_2_ptr: int, size: int, dtype: torch.dtype
) -> None:
    """Mark three Lamport buffers as empty, then wait for the device.

    For compatibility with existing callers ``size`` counts **bytes** here (each buffer gets
    ``size`` bytes), unlike trtllm_lamport_initialize, which counts elements.
    """
    op = "trtllm_lamport_initialize_all"
    elem = _elem_bytes(op, dtype)
    if _check_int(op, "size", size) < 0:
        raise ValueError(f"{op}: size ({size}) must be >= 0")
    require_cuda(op)
    for ptr in (buffer_0_ptr, buffer_1_ptr, buffer_2_ptr):
        _fill(op, ptr, size, elem)
    torch.cuda.synchronize()
