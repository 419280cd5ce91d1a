"""vLLM-style custom all-reduce: peer-to-peer reads of IPC-shared buffers.

Typical use (every rank):

    meta = create_shared_buffer(vllm_meta_size() + max_bytes)   # zero the signal header
    buf = create_shared_buffer(max_bytes)
    rank_data = torch.empty(8 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    fa = vllm_init_custom_ar(meta, rank_data, rank, full_nvlink=True)
    vllm_register_buffer(fa, buf)
    vllm_all_reduce(fa, inp, out, buf[rank], max_bytes, num_ctas=36)   # eager: staged via buf

Inside CUDA-graph capture, ``reg_buffer=0`` lets the graph read its inputs in place; after
capture every rank calls vllm_get_graph_buffer_ipc_meta, all-gathers the result and passes it
to vllm_register_graph_buffers before the first replay.

Results are the fp32-accumulated sum in rank order, rounded once to the dtype, and identical
on every rank. A rank that does not arrive within the timeout makes the others give up and
raise PeerTimeoutError instead of hanging.
"""

from __future__ import annotations

import torch

from .. import envs
from ..jit import load_module
from ..runtime.failures import check_device, failure_state
from ._register import register_op, tracing

_ALGORITHMS = {"auto": 0, "oneshot": 1, "twoshot": 2}
_handles: dict[int, tuple] = {}  # live handle -> (device, FailureState, failure count at creation)


_loaded = None


def _module():
    global _loaded
    if _loaded is None:
        _loaded = load_module("vllm_ar")
    return _loaded


def _as_ptr(op: str, value) -> int:
    if isinstance(value, torch.Tensor):
        return value.data_ptr()
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: expected an int pointer or a tensor, got {type(value).__name__}")
    return value


def _handle_device(op: str, fa: int) -> int:
    try:
        return _handles[fa][0]
    except (KeyError, TypeError):
        raise ValueError(f"{op}: fa ({fa!r}) is not a live handle (never created, or disposed)") from None


def _refuse_if_failed(op: str, fa: int) -> None:
    device, state, failures = _handles[fa]
    check_device(device)
    if state.failures != failures:
        raise RuntimeError(
            f"{op}: handle {fa} was created before a peer timeout on cuda:{device}; its signal "
            "counters may be out of step with its peers'. Dispose it and create a new one over "
            "fresh (zeroed) meta buffers on every rank.")


def vllm_meta_size() -> int:
    """Bytes of the signal header at the start of each rank's meta buffer (3456)."""
    return int(_module().vllm_meta_size())


def _init_impl(ipc_tensors: list[int], rank_data: torch.Tensor, rank: int, full_nvlink: bool,
               timeout_s: float) -> int:
    state = failure_state(rank_data.device.index)
    fa = int(_module().vllm_init_custom_ar(
        ipc_tensors, rank_data, rank, full_nvlink, state.claim_ptr, state.record_device_ptr,
        timeout_s,
    ))
    _handles[fa] = (rank_data.device.index, state, state.failures)
    return fa


def vllm_init_custom_ar(ipc_tensors, rank_data: torch.Tensor, rank: int, full_nvlink: bool,
                        *, timeout_s: float | None = None) -> int:
    """Create an all-reduce handle over every rank's meta buffer; returns an opaque int.

    ``ipc_tensors``: one pointer per rank (ints, or tensors whose data_ptr is used) to that
    rank's meta buffer as mapped in this process; each starts with a zeroed signal header of
    vllm_meta_size() bytes followed by scratch space at least as large as the largest message.
    ``rank_data``: a CUDA uint8 tensor holding 64-byte pointer records, one per registered
    buffer and per input captured in a CUDA graph. ``timeout_s`` bounds every wait for a peer
    (default FUSEDCOMM_TIMEOUT_S, 30 s).
    """
    op = "vllm_init_custom_ar"
    if not isinstance(ipc_tensors, (list, tuple)):
        raise TypeError(f"{op}: ipc_tensors must be a list with one pointer per rank")
    ptrs = [_as_ptr(op, p) for p in ipc_tensors]
    if not full_nvlink and len(ptrs) > 2:
        raise NotImplementedError(
            f"{op}: full_nvlink=False supports only 2 ranks (got {len(ptrs)}); without NVLink "
            "between every pair of GPUs use NCCL")
    if not isinstance(rank_data, torch.Tensor) or not rank_data.is_cuda:
        raise TypeError(f"{op}: rank_data must be a CUDA tensor")
    timeout = envs.default_timeout_s() if timeout_s is None else float(timeout_s)
    return _init_impl(ptrs, rank_data, int(rank), bool(full_nvlink), timeout)


def vllm_register_buffer(fa: int, fake_ipc_ptrs) -> None:
    """Record where every rank's copy of one IPC-shared buffer is mapped in this process.

    ``fake_ipc_ptrs``: one pointer per rank (own at index rank), e.g. the list returned by
    create_shared_buffer. The buffer can then be passed as ``reg_buffer`` or read in place.
    """
    op = "vllm_register_buffer"
    _handle_device(op, fa)
    _module().vllm_register_buffer(fa, [_as_ptr(op, p) for p in fake_ipc_ptrs])


def _all_reduce_impl(fa: int, inp: torch.Tensor, out: torch.Tensor, reg_buffer: int,
                     reg_buffer_sz_bytes: int, num_ctas: int, algorithm: int = 0) -> None:
    if fa not in _handles:
        _handle_device("vllm_all_reduce", fa)
    _refuse_if_failed("vllm_all_reduce", fa)
    (_loaded or _module()).vllm_all_reduce(fa, inp, out, reg_buffer, reg_buffer_sz_bytes, num_ctas, algorithm)


def _all_reduce_fake(fa, inp, out, reg_buffer, reg_buffer_sz_bytes, num_ctas, algorithm=0):
    return None


_all_reduce_op = register_op(
    "vllm_all_reduce(int fa, Tensor inp, Tensor(a!) out, int reg_buffer, "
    "int reg_buffer_sz_bytes, int num_ctas, int algorithm=0) -> ()",
    _all_reduce_impl,
    _all_reduce_fake,
)


def vllm_all_reduce(fa: int, inp: torch.Tensor, out: torch.Tensor, reg_buffer: int,
                    reg_buffer_sz_bytes: int, num_ctas: int, *, algorithm: str = "auto") -> None:
    """out = sum of ``inp`` over all ranks (out of place), on the current stream.

    If ``reg_buffer`` is non-zero (a registered buffer's own pointer) ``inp`` is first copied
    into it, inside the kernel; ``inp`` must fit in ``reg_buffer_sz_bytes``. With
    ``reg_buffer=0``, ``inp`` must itself be registered, or the stream must be capturing a
    CUDA graph (see vllm_register_graph_buffers). ``inp`` and ``out``: same dtype (float32,
    float16, bfloat16) and element count, contiguous, a multiple of 16 bytes. ``num_ctas``:
    1..36 thread blocks. ``algorithm``: "auto" (one-shot for 2 ranks and small messages,
    two-shot otherwise), "oneshot" or "twoshot".
    """
    try:
        code = _ALGORITHMS[algorithm]
    except (KeyError, TypeError):
        raise ValueError(f"vllm_all_reduce: algorithm ({algorithm!r}) must be one of "
                         f"{sorted(_ALGORITHMS)}") from None
    if tracing():
        _all_reduce_op(fa, inp, out, reg_buffer, reg_buffer_sz_bytes, num_ctas, code)
    else:
        _all_reduce_impl(fa, inp, out, reg_buffer, reg_buffer_sz_bytes, num_ctas, code)


def vllm_get_graph_buffer_ipc_meta(fa: int) -> tuple[list[int], list[int]]:
    """IPC handle bytes and offsets of every input captured since the last registration.

    Returns ``(handle_bytes, offsets)``: 64 bytes per captured input (as signed ints, one per
    byte, concatenated) and each input's byte offset inside its allocation.
    """
    _handle_device("vllm_get_graph_buffer_ipc_meta", fa)
    handles, offsets = _module().vllm_get_graph_buffer_ipc_meta(fa)
    return [int(b) for b in handles], [int(o) for o in offsets]


def vllm_register_graph_buffers(fa: int, handles, offsets) -> None:
    """Map every rank's captured inputs: ``handles[q]``, ``offsets[q]`` come from rank q's
    vllm_get_graph_buffer_ipc_meta. Call on every rank after capture, before the first replay.
    Handle bytes may be signed (-128..127) or unsigned (0..255)."""
    op = "vllm_register_graph_buffers"
    _handle_device(op, fa)
    h = [[int(b) for b in row] for row in handles]
    o = [[int(x) for x in row] for row in offsets]
    _module().vllm_register_graph_buffers(fa, h, o)


def vllm_dispose(fa: int) -> None:
    """Close the IPC mappings the handle opened and free it. The shared buffers stay alive."""
    op = "vllm_dispose"
    _handle_device(op, fa)
    _module().vllm_dispose(fa)
    _handles.pop(fa, None)


def _register_control_ops() -> None:
    """The control-path functions as custom ops too, so traced code may call them."""
    register_op("vllm_meta_size() -> int", vllm_meta_size)
    register_op(
        "vllm_init_custom_ar(int[] ipc_tensors, Tensor rank_data, int rank, bool full_nvlink, "
        "float timeout_s) -> int",
        _init_impl,
        lambda ipc_tensors, rank_data, rank, full_nvlink, timeout_s: 0,
    )
    register_op("vllm_register_buffer(int fa, int[] fake_ipc_ptrs) -> ()", vllm_register_buffer)
    register_op("vllm_dispose(int fa) -> ()", vllm_dispose)
    register_op("vllm_register_graph_buffers(int fa, int[][] handles, int[][] offsets) -> ()",
                vllm_register_graph_buffers)
    register_op("vllm_get_graph_buffer_ipc_meta(int fa) -> (int[], int[])",
                vllm_get_graph_buffer_ipc_meta)


_register_control_ops()
