"""CUDA IPC helpers: a ctypes binding to the CUDA runtime and shared buffers.

:class:`CudaRTLibrary` calls a handful of CUDA runtime functions directly,
without going through torch. :func:`create_shared_buffer` uses it to give every
rank of a group a device allocation that all other ranks of the group can read
and write through CUDA IPC; :func:`free_shared_buffer` releases it again.

Both buffer functions are collective: every rank of the group must call them,
in the same order.
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import operator
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .._checks import CudaUnavailableError, require_cuda

__all__ = [
    "CudaRTLibrary",
    "CudaUnavailableError",
    "cudaIpcMemHandle_t",
    "create_shared_buffer",
    "free_shared_buffer",
]

# From driver_types.h / cuda_runtime_api.h.
_CUDA_SUCCESS = 0
_CUDA_MEMCPY_DEFAULT = 4
_CUDA_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
_IPC_HANDLE_SIZE = 64

cudaError_t = ctypes.c_int
cudaMemcpyKind = ctypes.c_int


class cudaIpcMemHandle_t(ctypes.Structure):
    """The 64 opaque bytes that name a device allocation across processes."""

    _fields_ = [("internal", ctypes.c_byte * _IPC_HANDLE_SIZE)]


# name -> (return type, argument types). Every function returns a cudaError_t
# except cudaGetErrorString.
_FUNCTIONS: dict[str, tuple[Any, list[Any]]] = {
    "cudaSetDevice": (cudaError_t, [ctypes.c_int]),
    "cudaDeviceSynchronize": (cudaError_t, []),
    "cudaDeviceReset": (cudaError_t, []),
    "cudaGetErrorString": (ctypes.c_char_p, [cudaError_t]),
    "cudaMalloc": (cudaError_t, [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]),
    "cudaFree": (cudaError_t, [ctypes.c_void_p]),
    "cudaMemset": (cudaError_t, [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]),
    "cudaMemcpy": (
        cudaError_t,
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, cudaMemcpyKind],
    ),
    "cudaIpcGetMemHandle": (
        cudaError_t,
        [ctypes.POINTER(cudaIpcMemHandle_t), ctypes.c_void_p],
    ),
    "cudaIpcOpenMemHandle": (
        cudaError_t,
        [ctypes.POINTER(ctypes.c_void_p), cudaIpcMemHandle_t, ctypes.c_uint],
    ),
    "cudaIpcCloseMemHandle": (cudaError_t, [ctypes.c_void_p]),
}


def _loaded_libraries(name_part: str, maps_text: str | None = None) -> list[str]:
    """Paths of mapped shared objects whose path contains ``name_part``.

    Reads ``/proc/self/maps`` unless ``maps_text`` is given. The order is the
    order of first appearance; duplicates are dropped.
    """
    if maps_text is None:
        try:
            with open("/proc/self/maps") as f:
                maps_text = f.read()
        except OSError:
            return []
    found: list[str] = []
    for line in maps_text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 6:
            continue
        path = fields[5].strip()
        if path.endswith(" (deleted)"):
            continue
        base = os.path.basename(path)
        if name_part in base and ".so" in base and path not in found:
            found.append(path)
    return found


def _candidate_paths() -> list[str]:
    """Places a CUDA runtime library is commonly installed, best first."""
    dirs: list[str] = []
    try:
        import torch

        dirs.append(os.path.join(os.path.dirname(torch.__file__), "lib"))
    except ImportError:
        pass
    for entry in sys.path:
        nvidia = os.path.join(entry, "nvidia")
        if os.path.isdir(nvidia):
            dirs.append(os.path.join(nvidia, "cuda_runtime", "lib"))
            dirs.extend(sorted(glob.glob(os.path.join(nvidia, "cu*", "lib"))))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            dirs.append(os.path.join(home, "lib64"))
            dirs.append(os.path.join(home, "lib"))
    dirs.append("/usr/local/cuda/lib64")
    dirs.append("/usr/lib/x86_64-linux-gnu")
    dirs.append("/usr/lib/aarch64-linux-gnu")

    paths: list[str] = []
    for d in dirs:
        # Prefer versioned names (the runtime package ships those); newest last
        # in glob order, so reverse to try the newest first.
        for path in sorted(glob.glob(os.path.join(d, "libcudart.so*")), reverse=True):
            if os.path.isfile(path) and path not in paths:
                paths.append(path)
    return paths


def _find_cudart() -> str:
    loaded = _loaded_libraries("libcudart")
    if not loaded:
        # A CUDA build of torch links the runtime; importing torch maps it.
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
        loaded = _loaded_libraries("libcudart")
    if loaded:
        return loaded[0]
    candidates = _candidate_paths()
    if candidates:
        return candidates[0]
    raise RuntimeError(
        "CudaRTLibrary: libcudart was not found (it is not loaded in this process "
        "and no copy was found next to torch, in nvidia/* wheels, CUDA_HOME or "
        "/usr/local/cuda); pass so_file= with the path of libcudart.so"
    )


@dataclasses.dataclass
class _Loaded:
    lib: ctypes.CDLL
    funcs: dict[str, Any]


_LIBRARIES: dict[str, _Loaded] = {}
_LIBRARIES_LOCK = threading.Lock()


def _load(path: str) -> _Loaded:
    # The same file can be reached through symlinks (cuda -> cuda-13.0).
    if os.sep in path and os.path.exists(path):
        path = os.path.realpath(path)
    with _LIBRARIES_LOCK:
        loaded = _LIBRARIES.get(path)
        if loaded is not None:
            return loaded
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            raise RuntimeError(
                f"CudaRTLibrary: could not load the CUDA runtime from so_file={path!r}: {exc}"
            ) from exc
        funcs: dict[str, Any] = {}
        for name, (restype, argtypes) in _FUNCTIONS.items():
            try:
                fn = getattr(lib, name)
            except AttributeError as exc:
                raise RuntimeError(
                    f"CudaRTLibrary: {path!r} has no symbol {name}; is it libcudart?"
                ) from exc
            fn.restype = restype
            fn.argtypes = argtypes
            funcs[name] = fn
        loaded = _Loaded(lib, funcs)
        _LIBRARIES[path] = loaded
        return loaded


def _void_p(op: str, ptr: Any) -> ctypes.c_void_p:
    if isinstance(ptr, ctypes.c_void_p):
        return ptr
    if isinstance(ptr, bool) or not isinstance(ptr, int):
        raise TypeError(
            f"{op}: pointer must be an int or ctypes.c_void_p, got {type(ptr).__name__}"
        )
    return ctypes.c_void_p(ptr)


class CudaRTLibrary:
    """A small ctypes binding to the CUDA runtime (libcudart).

    With ``so_file=None`` the runtime already mapped into this process is used
    (the one a CUDA build of torch loads), so device selection and allocations
    are shared with torch. If none is mapped, copies next to torch, in the
    ``nvidia`` wheels, under ``CUDA_HOME`` or ``/usr/local/cuda`` are tried. If
    nothing is found a ``RuntimeError`` asks for ``so_file``. The loaded
    library is cached per path, because loading is process-wide.

    Every method raises ``RuntimeError("CUDART error: <text> (<code>) in
    <function>")`` when the runtime returns a non-zero status.
    """

    def __init__(self, so_file: str | None = None):
        if so_file is None:
            so_file = _find_cudart()
        elif not isinstance(so_file, (str, os.PathLike)):
            raise TypeError(
                f"CudaRTLibrary: so_file must be a path or None, got {type(so_file).__name__}"
            )
        self.so_file = os.fspath(so_file)
        loaded = _load(self.so_file)
        self.lib = loaded.lib
        self.funcs = loaded.funcs

    def _check(self, name: str, status: int) -> None:
        if status != _CUDA_SUCCESS:
            raise RuntimeError(
                f"CUDART error: {self.cudaGetErrorString(status)} ({status}) in {name}"
            )

    def cudaGetErrorString(self, error: int) -> str:
        text = self.funcs["cudaGetErrorString"](error)
        return text.decode("utf-8", "replace") if text else "unknown error"

    def cudaSetDevice(self, device: int) -> None:
        self._check("cudaSetDevice", self.funcs["cudaSetDevice"](device))

    def cudaDeviceSynchronize(self) -> None:
        self._check("cudaDeviceSynchronize", self.funcs["cudaDeviceSynchronize"]())

    def cudaDeviceReset(self) -> None:
        self._check("cudaDeviceReset", self.funcs["cudaDeviceReset"]())

    def cudaMalloc(self, size: int) -> ctypes.c_void_p:
        ptr = ctypes.c_void_p()
        self._check("cudaMalloc", self.funcs["cudaMalloc"](ctypes.byref(ptr), size))
        return ptr

    def cudaFree(self, ptr: Any) -> None:
        self._check("cudaFree", self.funcs["cudaFree"](_void_p("cudaFree", ptr)))

    def cudaMemset(self, ptr: Any, value: int, count: int) -> None:
        status = self.funcs["cudaMemset"](_void_p("cudaMemset", ptr), value, count)
        self._check("cudaMemset", status)

    def cudaMemcpy(self, dst: Any, src: Any, count: int) -> None:
        status = self.funcs["cudaMemcpy"](
            _void_p("cudaMemcpy", dst), _void_p("cudaMemcpy", src), count, _CUDA_MEMCPY_DEFAULT
        )
        self._check("cudaMemcpy", status)

    def cudaIpcGetMemHandle(self, ptr: Any) -> cudaIpcMemHandle_t:
        handle = cudaIpcMemHandle_t()
        status = self.funcs["cudaIpcGetMemHandle"](
            ctypes.byref(handle), _void_p("cudaIpcGetMemHandle", ptr)
        )
        self._check("cudaIpcGetMemHandle", status)
        return handle

    def cudaIpcOpenMemHandle(self, handle: cudaIpcMemHandle_t) -> ctypes.c_void_p:
        if not isinstance(handle, cudaIpcMemHandle_t):
            raise TypeError(
                "cudaIpcOpenMemHandle: handle must be a cudaIpcMemHandle_t, "
                f"got {type(handle).__name__}"
            )
        ptr = ctypes.c_void_p()
        status = self.funcs["cudaIpcOpenMemHandle"](
            ctypes.byref(ptr), handle, _CUDA_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
        )
        self._check("cudaIpcOpenMemHandle", status)
        return ptr

    def cudaIpcCloseMemHandle(self, ptr: Any) -> None:
        status = self.funcs["cudaIpcCloseMemHandle"](_void_p("cudaIpcCloseMemHandle", ptr))
        self._check("cudaIpcCloseMemHandle", status)


# --------------------------------------------------------------------------
# Shared buffers


@dataclasses.dataclass
class _SharedBuffer:
    own_index: int
    device: int
    lib: CudaRTLibrary


# Keyed by the tuple of pointers handed to the caller. The own allocation is
# unique while it lives, so two live entries never share a key.
_SHARED: dict[tuple[int, ...], _SharedBuffer] = {}
_SHARED_LOCK = threading.Lock()
_DEFAULT_LIB: CudaRTLibrary | None = None


def _default_lib() -> CudaRTLibrary:
    global _DEFAULT_LIB
    if _DEFAULT_LIB is None:
        _DEFAULT_LIB = CudaRTLibrary()
    return _DEFAULT_LIB


def _check_size(op: str, size_in_bytes: Any) -> int:
    if isinstance(size_in_bytes, bool):
        raise TypeError(f"{op}: size_in_bytes must be an int, got bool")
    if not isinstance(size_in_bytes, int):
        try:
            size_in_bytes = operator.index(size_in_bytes)
        except TypeError:
            raise TypeError(
                f"{op}: size_in_bytes must be an int, got {type(size_in_bytes).__name__}"
            ) from None
    if size_in_bytes <= 0:
        raise ValueError(f"{op}: size_in_bytes ({size_in_bytes}) must be > 0")
    return int(size_in_bytes)


def create_shared_buffer(
    size_in_bytes: int, group: Any = None, *, comm_backend: Any = None
) -> list[int]:
    """Allocate ``size_in_bytes`` on every rank and map each allocation on every rank.

    Collective over ``group`` (default: the WORLD ``torch.distributed`` group)
    or over ``comm_backend`` when one is given. Each rank allocates with
    ``cudaMalloc`` on its current CUDA device (``torch.cuda.current_device()``),
    exports an IPC handle, gathers the handles of all ranks, and opens the
    other ranks' handles. Returns one pointer per rank, in rank order inside
    the group; the entry at this rank's index is its own allocation. The
    memory is not cleared. Ends with a barrier.

    Release with :func:`free_shared_buffer`, passing the returned list.
    """
    op = "create_shared_buffer"
    size = _check_size(op, size_in_bytes)
    require_cuda(op)

    import torch

    from fusedcomm.runtime.comm_backend import resolve_backend

    backend = resolve_backend(comm_backend, group)
    rank = backend.Get_rank()
    world = backend.Get_size()
    device = torch.cuda.current_device()
    lib = _default_lib()
    lib.cudaSetDevice(device)

    own = lib.cudaMalloc(size)
    opened: list[int] = []
    try:
        handle = lib.cudaIpcGetMemHandle(own)
        handles = backend.allgather(bytes(handle))
        if len(handles) != world:
            raise RuntimeError(
                f"{op}: the communicator returned {len(handles)} handles for {world} ranks"
            )
        pointers: list[int] = []
        for i, raw in enumerate(handles):
            if i == rank:
                pointers.append(int(own.value))
                continue
            peer = lib.cudaIpcOpenMemHandle(cudaIpcMemHandle_t.from_buffer_copy(bytes(raw)))
            opened.append(int(peer.value))
            pointers.append(int(peer.value))
    except BaseException:
        # Best effort: drop what this rank mapped or allocated, then re-raise.
        for ptr in opened:
            try:
                lib.cudaIpcCloseMemHandle(ptr)
            except RuntimeError:
                pass
        try:
            lib.cudaFree(own)
        except RuntimeError:
            pass
        raise

    with _SHARED_LOCK:
        _SHARED[tuple(pointers)] = _SharedBuffer(own_index=rank, device=device, lib=lib)
    backend.barrier()
    return pointers


def free_shared_buffer(
    pointers: Sequence[int], group: Any = None, *, comm_backend: Any = None
) -> None:
    """Release a buffer made by :func:`create_shared_buffer`.

    Collective over the same group. Closes the mappings of the other ranks'
    allocations, waits for every rank, frees this rank's allocation, and waits
    again so that no rank returns while a peer could still touch its memory.
    ``ValueError`` if ``pointers`` is not a live list returned by
    :func:`create_shared_buffer` in this process.
    """
    op = "free_shared_buffer"
    if isinstance(pointers, (str, bytes)) or not isinstance(pointers, Sequence):
        raise TypeError(
            f"{op}: pointers must be the list returned by create_shared_buffer, "
            f"got {type(pointers).__name__}"
        )
    try:
        key = tuple(int(p) for p in pointers)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: pointers must be a list of ints") from None
    with _SHARED_LOCK:
        known = key in _SHARED
    if not known:
        raise ValueError(
            f"{op}: pointers ({len(key)} entries) were not returned by a live "
            "create_shared_buffer call in this process (already freed?)"
        )

    from fusedcomm.runtime.comm_backend import resolve_backend

    backend = resolve_backend(comm_backend, group)
    with _SHARED_LOCK:
        record = _SHARED.pop(key, None)
    if record is None:
        raise ValueError(f"{op}: pointers were freed concurrently by another thread")
    import torch

    # Kernels still queued on this device may read the peers' memory: let them finish before
    # the mappings close. (Closing and freeing need no particular current device, so the
    # caller's device selection is left alone.)
    torch.cuda.synchronize(record.device)
    lib = record.lib
    for i, ptr in enumerate(key):
        if i != record.own_index:
            lib.cudaIpcCloseMemHandle(ptr)
    backend.barrier()
    lib.cudaFree(key[record.own_index])
    backend.barrier()
