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
on every rank. A rank that does not arrive within the timeout raises PeerTimeoutError; it tells
its peers, which raise PeerAbortedError, so no rank hangs or keeps a wrong result unreported
(docs/failure-protocol.md). Kernels are built per (dtype, world size) on first use.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .. import envs
from ..jit import allreduce_peer as specs
from ..jit import load
from ..jit.configs import dtype_key, world_key
from ..runtime.failures import FailureState, FamilyNames
from ._register import register_op, tracing


@dataclasses.dataclass
class _Handle:
    device: int
    world: int
    failure: FailureState
    launchers: dict  # torch dtype -> kernel launcher address
    run: object  # the control module's all-reduce entry (looked up once)


_handles: dict[int, _Handle] = {}
# Algorithm name -> code, from the control module; filled when the first handle is created
# (eagerly), so traced code reads a plain dict.
_ALGORITHMS: dict[str, int] = {}


@functools.cache
def _control():
    """The host-only control module (no GPU or architecture needed to load it)."""
    return load(specs.control_spec())


@functools.cache
def _describe() -> dict:
    return dict(_control().allreduce_peer_describe())


def _algorithm_code(algorithm) -> int:
    if not _ALGORITHMS:
        _ALGORITHMS.update((str(a), i) for i, a in enumerate(_describe()["algorithms"]))
    code = _ALGORITHMS.get(algorithm) if isinstance(algorithm, str) else None
    if code is None:
        raise ValueError(
            f"vllm_all_reduce: algorithm ({algorithm!r}) must be one of {list(_ALGORITHMS)}"
        )
    return code


def _launcher(h: _Handle, dtype: torch.dtype) -> int:
    """The launcher of the kernel module for (dtype, world), loaded (built) on first use."""
    module = load(specs.kernel_spec(dtype_key(dtype, "vllm_all_reduce"), world_key(h.world)))
    if int(module.allreduce_peer_abi()) != int(_control().allreduce_peer_abi()):
        raise RuntimeError(
            "vllm_all_reduce: the kernel and control modules were built from "
            "different sources; clear the JIT cache or rebuild the prebuilt set"
        )
    address = h.launchers[dtype] = int(module.allreduce_peer_launcher())
    return address


def _as_ptr(op: str, value) -> int:
    if isinstance(value, torch.Tensor):
        return value.data_ptr()
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: expected an int pointer or a tensor, got {type(value).__name__}")
    return value


def _handle(op: str, fa: int) -> _Handle:
    try:
        return _handles[fa]
    except (KeyError, TypeError):
        raise ValueError(
            f"{op}: fa ({fa!r}) is not a live handle (never created, or disposed)"
        ) from None


def vllm_meta_size() -> int:
    """Bytes of the signal header at the start of each rank's meta buffer.

    A constant of the library (no GPU needed); each rank's meta buffer is this header followed
    by scratch space for two-shot partial sums (as large as the largest message).
    """
    return int(_describe()["meta_bytes"])


def _init_impl(
    ipc_tensors: list[int],
    rank_data: torch.Tensor,
    rank: int,
    full_nvlink: bool,
    timeout_s: float,
    meta_bytes: int = 0,
) -> int:
    device = rank_data.device.index
    d = _describe()
    _algorithm_code("auto")  # fills the algorithm table: a traced call never loads a module
    failure = FailureState(device, FamilyNames(str(d["op"]), tuple(str(p) for p in d["phases"])))
    try:
        fa = int(
            _control().allreduce_peer_init(
                ipc_tensors,
                rank_data,
                rank,
                full_nvlink,
                failure.claim_ptr,
                failure.record_device_ptr,
                timeout_s,
                meta_bytes,
            )
        )
    except BaseException:
        failure.close()
        raise
    _handles[fa] = _Handle(
        device, len(ipc_tensors), failure, {}, _control().allreduce_peer_all_reduce
    )
    _algorithm_code("auto")  # fills _ALGORITHMS outside any trace
    return fa


def vllm_init_custom_ar(
    ipc_tensors,
    rank_data: torch.Tensor,
    rank: int,
    full_nvlink: bool,
    *,
    timeout_s: float | None = None,
    meta_bytes: int | None = None,
) -> int:
    """Create an all-reduce handle over every rank's meta buffer; returns an opaque int.

    ``ipc_tensors``: one pointer per rank (ints, or tensors whose data_ptr is used) to that
    rank's meta buffer as mapped in this process; each starts with a zeroed signal header of
    vllm_meta_size() bytes followed by scratch space at least as large as the largest message.
    ``rank_data``: a CUDA uint8 tensor holding 64-byte pointer records, one per registered
    buffer and per input captured in a CUDA graph. ``timeout_s`` bounds every wait for a peer
    (default FUSEDCOMM_TIMEOUT_S, 30 s). ``meta_bytes``: the size of each meta buffer, header
    included (default: up to the end of the allocation holding this rank's meta buffer); two-shot
    messages that need more scratch than it holds are refused before launch.

    If a wait gives up, on any rank, every rank's next call (or check_errors()) raises a
    CommFailureError subclass and the handle is refused from then on: dispose of it and create
    a new one over fresh, zeroed meta buffers on every rank.
    """
    op = "vllm_init_custom_ar"
    if not isinstance(ipc_tensors, (list, tuple)):
        raise TypeError(f"{op}: ipc_tensors must be a list with one pointer per rank")
    ptrs = [_as_ptr(op, p) for p in ipc_tensors]
    if not full_nvlink and len(ptrs) > 2:
        raise NotImplementedError(
            f"{op}: full_nvlink=False supports only 2 ranks (got {len(ptrs)}); without NVLink "
            "between every pair of GPUs use NCCL"
        )
    if not isinstance(rank_data, torch.Tensor) or not rank_data.is_cuda:
        raise TypeError(f"{op}: rank_data must be a CUDA tensor")
    timeout = envs.default_timeout_s() if timeout_s is None else float(timeout_s)
    if meta_bytes is not None and (
        isinstance(meta_bytes, bool) or not isinstance(meta_bytes, int) or meta_bytes <= 0
    ):
        raise ValueError(f"{op}: meta_bytes ({meta_bytes!r}) must be a positive int")
    return _init_impl(ptrs, rank_data, int(rank), bool(full_nvlink), timeout, meta_bytes or 0)


def vllm_register_buffer(fa: int, fake_ipc_ptrs) -> None:
    """Record where every rank's copy of one IPC-shared buffer is mapped in this process.

    ``fake_ipc_ptrs``: one pointer per rank (own at index rank), e.g. the list returned by
    create_shared_buffer. The buffer can then be passed as ``reg_buffer`` or read in place.
    """
    op = "vllm_register_buffer"
    _handle(op, fa).failure.check(op)
    _control().allreduce_peer_register_buffer(fa, [_as_ptr(op, p) for p in fake_ipc_ptrs])


def _all_reduce_impl(
    fa: int,
    inp: torch.Tensor,
    out: torch.Tensor,
    reg_buffer: int,
    reg_buffer_sz_bytes: int,
    num_ctas: int,
    algorithm: int = 0,
) -> None:
    h = _handles.get(fa) or _handle("vllm_all_reduce", fa)
    h.failure.check("vllm_all_reduce")
    launcher = h.launchers.get(inp.dtype) or _launcher(h, inp.dtype)
    h.run(fa, inp, out, reg_buffer, reg_buffer_sz_bytes, num_ctas, algorithm, launcher)


def _all_reduce_fake(fa, inp, out, reg_buffer, reg_buffer_sz_bytes, num_ctas, algorithm=0):
    return None


_all_reduce_op = register_op(
    "vllm_all_reduce(int fa, Tensor inp, Tensor(a!) out, int reg_buffer, "
    "int reg_buffer_sz_bytes, int num_ctas, int algorithm=0) -> ()",
    _all_reduce_impl,
    _all_reduce_fake,
)


def vllm_all_reduce(
    fa: int,
    inp: torch.Tensor,
    out: torch.Tensor,
    reg_buffer: int,
    reg_buffer_sz_bytes: int,
    num_ctas: int,
    *,
    algorithm: str = "auto",
) -> None:
    """out = sum of ``inp`` over all ranks (out of place), on the current stream.

    If ``reg_buffer`` is non-zero (a registered buffer's own pointer) ``inp`` is first copied
    into it, inside the kernel; ``inp`` must fit in ``reg_buffer_sz_bytes``. With
    ``reg_buffer=0``, ``inp`` must itself be registered, or the stream must be capturing a
    CUDA graph (see vllm_register_graph_buffers). ``inp`` and ``out``: same dtype (float32,
    float16, bfloat16) and element count, contiguous, a multiple of 16 bytes. ``num_ctas``:
    1..36 thread blocks. ``algorithm``: "auto" (one-shot for 2 ranks and small messages,
    two-shot otherwise), "oneshot" or "twoshot".
    """
    code = _algorithm_code(algorithm)
    if tracing():
        _all_reduce_op(fa, inp, out, reg_buffer, reg_buffer_sz_bytes, num_ctas, code)
    else:
        _all_reduce_impl(fa, inp, out, reg_buffer, reg_buffer_sz_bytes, num_ctas, code)


def vllm_get_graph_buffer_ipc_meta(fa: int) -> tuple[list[int], list[int]]:
    """IPC handle bytes and offsets of every input captured since the last registration.

    Returns ``(handle_bytes, offsets)``: 64 bytes per captured input (as signed ints, one per
    byte, concatenated) and each input's byte offset inside its allocation.
    """
    _handle("vllm_get_graph_buffer_ipc_meta", fa)
    handles, offsets = _control().allreduce_peer_graph_meta(fa)
    return [int(b) for b in handles], [int(o) for o in offsets]


def vllm_register_graph_buffers(fa: int, handles, offsets) -> None:
    """Map every rank's captured inputs: ``handles[q]``, ``offsets[q]`` come from rank q's
    vllm_get_graph_buffer_ipc_meta. Call on every rank after capture, before the first replay.
    Handle bytes may be signed (-128..127) or unsigned (0..255)."""
    op = "vllm_register_graph_buffers"
    _handle(op, fa)
    h = [[int(b) for b in row] for row in handles]
    o = [[int(x) for x in row] for row in offsets]
    _control().allreduce_peer_register_graph(fa, h, o)


def vllm_dispose(fa: int) -> None:
    """Close the IPC mappings the handle opened and free it. The shared buffers stay alive.

    Synchronises the device first (queued kernels may still read through the mappings).
    """
    op = "vllm_dispose"
    h = _handle(op, fa)
    _control().allreduce_peer_dispose(fa)
    _handles.pop(fa, None)
    h.failure.close()


def _register_control_ops() -> None:
    """The control-path functions as custom ops too, so traced code may call them."""
    register_op("vllm_meta_size() -> int", vllm_meta_size)
    register_op(
        "vllm_init_custom_ar(int[] ipc_tensors, Tensor rank_data, int rank, bool full_nvlink, "
        "float timeout_s, int meta_bytes=0) -> int",
        _init_impl,
        lambda ipc_tensors, rank_data, rank, full_nvlink, timeout_s, meta_bytes=0: 0,
    )
    register_op("vllm_register_buffer(int fa, int[] fake_ipc_ptrs) -> ()", vllm_register_buffer)
    register_op("vllm_dispose(int fa) -> ()", vllm_dispose)
    register_op(
        "vllm_register_graph_buffers(int fa, int[][] handles, int[][] offsets) -> ()",
        vllm_register_graph_buffers,
    )
    register_op(
        "vllm_get_graph_buffer_ipc_meta(int fa) -> (int[], int[])", vllm_get_graph_buffer_ipc_meta
    )


_register_control_ops()
