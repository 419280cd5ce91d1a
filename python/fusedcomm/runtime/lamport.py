"""Lamport buffer initialisation: fill buffers with negative zero, the 'not yet written' mark.

The workspaces fill their Lamport regions through these functions at creation; the public
names are also exported at the top level, and ``ops/lamport.py`` registers the fill as the
torch op ``fusedcomm::trtllm_lamport_initialize``.
"""

from __future__ import annotations

import torch

from .._checks import element_size, int_arg, require_cuda
from ..jit import load_module


def fill(op: str, ptr: int, num_bytes: int, elem_bytes: int) -> None:
    """Write the sentinel into ``num_bytes`` bytes at ``ptr`` (words of ``elem_bytes``) on the
    current stream of the current device."""
    int_arg(op, "buffer pointer", ptr)
    if ptr == 0 or ptr % 16:
        raise ValueError(f"{op}: buffer pointer ({ptr:#x}) must be non-null and 16-byte aligned")
    device = torch.cuda.current_device()
    stream = torch.cuda.current_stream(device).cuda_stream
    load_module("lamport").lamport_initialize(ptr, num_bytes, elem_bytes, device, stream)


def trtllm_lamport_initialize(buffer_ptr: int, size: int, dtype: torch.dtype) -> None:
    """Mark ``size`` elements of ``dtype`` at ``buffer_ptr`` as empty (negative zero).

    Runs on the current CUDA stream of the current device. Exactly ``size`` elements are
    written, also when that is not a multiple of 16 bytes (nothing past the end is touched).
    """
    op = "trtllm_lamport_initialize"
    elem = element_size(op, dtype)
    int_arg(op, "size", size, 0)
    if torch.compiler.is_compiling():
        # A raw pointer gives torch.compile nothing to order the fill with, so a compiled graph
        # could drop or reorder it: refuse rather than silently skip it.
        raise NotImplementedError(
            f"{op}: call it outside torch.compile regions (setup code); "
            "it fills raw device memory that the graph cannot see"
        )
    require_cuda(op)
    fill(op, buffer_ptr, size * elem, elem)


def trtllm_lamport_initialize_all(
    buffer_0_ptr: int, buffer_1_ptr: int, buffer_2_ptr: int, size: int, dtype: torch.dtype
) -> None:
    """Mark three Lamport buffers as empty, then wait for the device.

    For compatibility with existing callers ``size`` counts **bytes** here (each buffer gets
    ``size`` bytes), unlike trtllm_lamport_initialize, which counts elements.
    """
    op = "trtllm_lamport_initialize_all"
    elem = element_size(op, dtype)
    int_arg(op, "size", size, 0)
    require_cuda(op)
    for ptr in (buffer_0_ptr, buffer_1_ptr, buffer_2_ptr):
        fill(op, ptr, size, elem)
    torch.cuda.synchronize()
