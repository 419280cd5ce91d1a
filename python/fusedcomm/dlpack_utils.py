"""Tensor views over raw device memory, built through DLPack.

:func:`pack_strided_memory` turns a device pointer (for example one entry of
the list returned by :func:`fusedcomm.runtime.cuda_ipc.create_shared_buffer`) into a
torch tensor that reads and writes that memory in place. The tensor does not
own the memory: the caller keeps the allocation alive for as long as the
tensor (or any view of it) is used.

How the view is made: a ``DLManagedTensor`` (the unversioned DLPack struct
that ``"dltensor"`` capsules carry) is written, together with its shape and
stride arrays, into one block from the C allocator. Its deleter is the C
``free`` itself, so when torch drops the last reference it releases the whole
block with no Python code involved (safe from any thread and at interpreter
exit). The block is wrapped in a capsule that torch consumes immediately; if
torch refuses it, the block is freed here. Each call makes a new capsule.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
import torch.utils.dlpack

from ._checks import int_arg, require_cuda

__all__ = ["pack_strided_memory"]

# DLDeviceType values.
KDL_CPU = 1
KDL_CUDA = 2

# DLDataTypeCode values.
_KDL_INT = 0
_KDL_UINT = 1
_KDL_FLOAT = 2
_KDL_BFLOAT = 4


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        # void (*deleter)(DLManagedTensor*); stored as a plain address.
        ("deleter", ctypes.c_void_p),
    ]


# malloc and free come from the same global symbol scope, so they pair even
# when an allocator such as jemalloc is preloaded.
_libc = ctypes.CDLL(None)
_malloc = _libc.malloc
_malloc.restype = ctypes.c_void_p
_malloc.argtypes = [ctypes.c_size_t]
_free = _libc.free
_free.restype = None
_free.argtypes = [ctypes.c_void_p]
_FREE_ADDRESS = ctypes.cast(_free, ctypes.c_void_p).value

# A private handle on the Python C API so that argument types set here do not
# clash with other users of ctypes.pythonapi.
_pyapi = ctypes.PyDLL(ctypes.pythonapi._name, handle=ctypes.pythonapi._handle)
_capsule_new = _pyapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule_is_valid = _pyapi.PyCapsule_IsValid
_capsule_is_valid.restype = ctypes.c_int
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]

# Kept referenced for the module's lifetime: the capsule stores this pointer.
_CAPSULE_NAME = b"dltensor"


def _dl_types() -> dict[torch.dtype, tuple[torch.dtype, int, int]]:
    """dtype -> (dtype described to DLPack, DLPack type code, bits).

    Types that not every torch release accepts through DLPack (float8, wide
    unsigned ints) travel as a same-width integer and are re-viewed afterwards,
    which keeps shape and strides unchanged.
    """
    table: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
        torch.float16: (torch.float16, _KDL_FLOAT, 16),
        torch.bfloat16: (torch.bfloat16, _KDL_BFLOAT, 16),
        torch.float32: (torch.float32, _KDL_FLOAT, 32),
        torch.float64: (torch.float64, _KDL_FLOAT, 64),
        torch.int8: (torch.int8, _KDL_INT, 8),
        torch.int16: (torch.int16, _KDL_INT, 16),
        torch.int32: (torch.int32, _KDL_INT, 32),
        torch.int64: (torch.int64, _KDL_INT, 64),
        torch.uint8: (torch.uint8, _KDL_UINT, 8),
    }
    carried = {
        "float8_e4m3fn": (torch.uint8, _KDL_UINT, 8),
        "float8_e5m2": (torch.uint8, _KDL_UINT, 8),
        "uint16": (torch.int16, _KDL_INT, 16),
        "uint32": (torch.int32, _KDL_INT, 32),
        "uint64": (torch.int64, _KDL_INT, 64),
    }
    for name, entry in carried.items():
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            table[dtype] = entry
    return table


_DL_TYPES = _dl_types()


def _view_from_pointer(
    ptr: int,
    shape: Sequence[int],
    strides: Sequence[int],
    dtype: torch.dtype,
    device_type: int,
    dev_id: int,
) -> torch.Tensor:
    """A non-owning tensor over ``ptr`` with ``shape`` and ``strides`` (in elements).

    ``device_type`` is a DLPack device type (``KDL_CUDA`` for GPU memory,
    ``KDL_CPU`` for host memory). Arguments are trusted: callers validate.
    """
    if device_type == KDL_CUDA:
        require_cuda("pack_strided_memory")  # not torch's AssertionError from a CPU-only build
    carrier, code, bits = _DL_TYPES[dtype]
    ndim = len(shape)
    head = ctypes.sizeof(_DLManagedTensor)
    array_bytes = ctypes.sizeof(ctypes.c_int64) * ndim
    block = _malloc(head + 2 * array_bytes)
    if not block:
        raise MemoryError("pack_strided_memory: could not allocate the DLPack descriptor")

    shape_addr = block + head
    strides_addr = shape_addr + array_bytes
    (ctypes.c_int64 * ndim).from_address(shape_addr)[:] = [int(s) for s in shape]
    (ctypes.c_int64 * ndim).from_address(strides_addr)[:] = [int(s) for s in strides]

    managed = _DLManagedTensor.from_address(block)
    tensor = managed.dl_tensor
    tensor.data = ptr
    tensor.device.device_type = device_type
    tensor.device.device_id = dev_id
    tensor.ndim = ndim
    tensor.dtype.code = code
    tensor.dtype.bits = bits
    tensor.dtype.lanes = 1
    tensor.shape = ctypes.cast(shape_addr, ctypes.POINTER(ctypes.c_int64))
    tensor.strides = ctypes.cast(strides_addr, ctypes.POINTER(ctypes.c_int64))
    tensor.byte_offset = 0
    managed.manager_ctx = None
    managed.deleter = _FREE_ADDRESS

    consumed = False
    try:
        capsule = _capsule_new(block, _CAPSULE_NAME, None)
        try:
            out = torch.utils.dlpack.from_dlpack(capsule)
        finally:
            # torch renames the capsule once it has taken ownership.
            consumed = not _capsule_is_valid(capsule, _CAPSULE_NAME)
    finally:
        if not consumed:
            _free(block)
    return out if carrier == dtype else out.view(dtype)


def pack_strided_memory(
    ptr: int,
    segment_size: int,
    segment_stride: int,
    num_segments: int,
    dtype: torch.dtype,
    dev_id: int,
) -> torch.Tensor:
    """View ``num_segments`` equally spaced segments of device memory as a 2-D tensor.

    Segment ``i`` covers bytes ``[ptr + i * segment_stride, ptr + i *
    segment_stride + segment_size)`` on CUDA device ``dev_id``. The result has
    shape ``[num_segments, segment_size // elem]`` and strides
    ``[segment_stride // elem, 1]``, where ``elem`` is the size of ``dtype`` in
    bytes. All sizes are in bytes. The tensor does not own the memory; writes
    through it change the memory in place.

    Supported dtypes: float8_e4m3fn, float8_e5m2, float16, bfloat16, float32,
    float64, int8/16/32/64 and uint8/16/32/64 (``NotImplementedError``
    otherwise). Arguments are checked before the memory is touched.
    """
    op = "pack_strided_memory"
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{op}: dtype must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in _DL_TYPES:
        raise NotImplementedError(f"{op}: dtype {dtype} is not supported")
    if isinstance(ptr, bool) or not isinstance(ptr, int):
        raise TypeError(f"{op}: ptr must be an int, got {type(ptr).__name__}")
    if ptr <= 0 or ptr >= 1 << 64:
        raise ValueError(f"{op}: ptr ({ptr:#x}) must be a non-null 64-bit address")
    int_arg(op, "segment_size", segment_size, 1)
    int_arg(op, "segment_stride", segment_stride, 1)
    int_arg(op, "num_segments", num_segments, 1)
    int_arg(op, "dev_id", dev_id, 0)
    elem = dtype.itemsize
    if segment_size % elem:
        raise ValueError(
            f"{op}: segment_size ({segment_size}) must be a multiple of the element size "
            f"{elem} of {dtype}"
        )
    if segment_stride % elem:
        raise ValueError(
            f"{op}: segment_stride ({segment_stride}) must be a multiple of the element size "
            f"{elem} of {dtype}"
        )
    if segment_stride < segment_size:
        raise ValueError(
            f"{op}: segment_stride ({segment_stride}) must be >= segment_size ({segment_size})"
        )
    shape = (num_segments, segment_size // elem)
    strides = (segment_stride // elem, 1)
    return _view_from_pointer(ptr, shape, strides, dtype, KDL_CUDA, dev_id)
