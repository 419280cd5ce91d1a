"""Peer-mapped device memory: every rank's row at one fixed stride, in one address range.

The MoE all-to-all kernels address a workspace tensor ``uint8 [W, size_per_rank]`` in which
row ``q`` is rank ``q``'s GPU memory, on every rank of a group of processes on one node (one
GPU per process)::

    base + 0 * row_stride    rank 0's allocation   (row_stride bytes mapped, size_per_rank used)
    base + 1 * row_stride    rank 1's allocation
    ...
    base + (W-1) * row_stride

A kernel finds any peer's byte ``i`` at ``base + q * row_stride + i``, with one stride for all
rows. CUDA IPC (``cudaIpcOpenMemHandle``) cannot give that: it maps each peer's buffer wherever
the driver chooses, so the rows land at unrelated addresses. The driver's virtual memory
management (VMM) can: each rank creates its row with ``cuMemCreate``, exports it as a POSIX file
descriptor, and every rank reserves one range of ``W * row_stride`` bytes and maps the W
allocations into it, row by row. ``row_stride`` is ``size_per_rank`` rounded up to the driver's
allocation granularity. Only unicast mappings are made (no multicast, no fabric handles).

File descriptors are process-local, so they travel between ranks over Unix-domain sockets in
Linux's abstract namespace, with ``SCM_RIGHTS`` (:func:`exchange_fds`). The comm backend
carries only a random token that names the sockets, plus each step's outcome: when a step
fails on any rank, every rank raises and frees what it made.

Typical use (every rank of the group)::

    memory = PeerMemory(size_per_rank, comm_backend, device=local_rank)
    workspace = memory.as_tensor()  # uint8 [W, size_per_rank], strides (row_stride, 1)
    ...                             # kernels read and write every row
    del workspace
    memory.close()
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
import struct
import threading
import time
from typing import Any

import torch

from .._checks import int_arg
from ..dlpack_utils import pack_strided_memory
from .comm_backend import local_step
from .cuda_ipc import require_cuda

__all__ = ["EXCHANGE_TIMEOUT_S", "PeerMemory", "exchange_fds", "peer_memory_workspace"]

# How long one rank waits for a peer during the fd exchange, by default.
EXCHANGE_TIMEOUT_S = 60.0

_BACKEND_METHODS = ("Get_rank", "Get_size", "allgather", "bcast", "barrier")
_RANK = struct.Struct("<i")  # what the two ends of a connection say first: their rank
_POLL_S = 0.2  # how often the serving thread looks at its stop flag
_HELLO_S = 5.0  # how long the server waits for a connected process to say its rank
_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


@functools.cache
def _runtime():
    from ..jit import load_module

    return load_module("runtime")


def _timeout_arg(op: str, timeout_s: Any) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise TypeError(f"{op}: timeout_s must be a number of seconds, got {timeout_s!r}")
    if not timeout_s > 0:
        raise ValueError(f"{op}: timeout_s ({timeout_s}) must be > 0")
    return float(timeout_s)


def _check_backend(op: str, backend: Any) -> Any:
    missing = [m for m in _BACKEND_METHODS if not callable(getattr(backend, m, None))]
    if missing:
        raise TypeError(
            f"{op}: comm_backend must provide {', '.join(_BACKEND_METHODS)}; "
            f"{type(backend).__name__} lacks {', '.join(missing)}"
        )
    return backend


def _close_quietly(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------
# The fd exchange


def _socket_name(token: str, rank: int) -> str:
    return f"\0fusedcomm-peer-memory-{token}-{rank}"


def _peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a connected Unix socket."""
    _, uid, _ = _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
    return uid


class _Stray(Exception):
    """A connection to the server that is not a peer's request (ignored, never fatal)."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


class _FdServer(threading.Thread):
    """Hands ``fd`` to each of the ``world - 1`` peers that connect to ``listener``.

    The socket's name is in the abstract namespace, which any local process can connect to: a
    connection that is not a peer's request (another user's process, one that says nothing
    within ``_HELLO_S``, no valid rank, a rank already served) is closed without an fd and
    noted in ``strays``; serving goes on. Only a failure to send the fd to a peer is fatal.
    """

    def __init__(self, listener: socket.socket, fd: int, rank: int, world: int, timeout_s: float):
        super().__init__(name=f"fusedcomm-peer-memory-serve-{rank}", daemon=True)
        self.listener, self.fd, self.rank, self.world = listener, fd, rank, world
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.served: set[int] = set()
        self.strays: list[str] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self.error = exc

    def _serve(self) -> None:
        self.listener.settimeout(_POLL_S)
        while len(self.served) < self.world - 1 and not self.stop.is_set():
            if time.monotonic() > self.deadline:
                waiting = sorted(set(range(self.world)) - self.served - {self.rank})
                raise TimeoutError(
                    f"rank {self.rank} waited {self.timeout_s:g} s for ranks {waiting} to "
                    "fetch its fd"
                )
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(min(max(self.deadline - time.monotonic(), _POLL_S), _HELLO_S))
                try:
                    peer = self._requester(conn)
                except _Stray as stray:
                    self.strays.append(str(stray))
                    continue
                socket.send_fds(conn, [_RANK.pack(self.rank)], [self.fd])
                self.served.add(peer)

    def _requester(self, conn: socket.socket) -> int:
        """The peer rank asking on ``conn``; raises _Stray for anything else."""
        try:
            uid = _peer_uid(conn)
            if uid != os.getuid():
                raise _Stray(f"rank {self.rank}: a process of user {uid} asked for its fd")
            said = _recv_exact(conn, _RANK.size)
        except OSError as exc:  # includes the hello timeout
            raise _Stray(
                f"rank {self.rank}: a connection failed before saying a rank: {exc}"
            ) from None
        if len(said) != _RANK.size:
            raise _Stray(f"rank {self.rank}: a process connected but did not say its rank")
        (peer,) = _RANK.unpack(said)
        if not 0 <= peer < self.world or peer == self.rank or peer in self.served:
            raise _Stray(f"rank {self.rank}: unexpected request from rank {peer}")
        return peer

    def result(self, wait_s: float) -> None:
        """Raise what went wrong while serving (after waiting up to ``wait_s`` to finish)."""
        self.join(wait_s)
        if self.error is not None:
            raise self.error
        if self.is_alive():
            raise TimeoutError(f"rank {self.rank}: still serving its fd after {wait_s:g} s")


def _fetch_fd(token: str, rank: int, peer: int, timeout_s: float) -> int:
    """Connect to ``peer``'s socket and receive its fd (a new fd of this process)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(_socket_name(token, peer))
            # Anyone can bind an abstract name first: take an fd only from this user's process.
            uid = _peer_uid(sock)
            if uid != os.getuid():
                raise PermissionError(
                    f"rank {rank}: the socket of rank {peer} belongs to a process of user {uid}, "
                    f"not of this user ({os.getuid()}); refusing to take an fd from it"
                )
            sock.sendall(_RANK.pack(rank))
            msg, fds, _, _ = socket.recv_fds(sock, _RANK.size, 1)
        except TimeoutError:
            raise TimeoutError(
                f"rank {rank} waited {timeout_s:g} s for rank {peer} to send its fd"
            ) from None
        except PermissionError:
            raise
        except OSError as exc:
            raise ConnectionError(f"rank {rank} could not fetch rank {peer}'s fd: {exc}") from exc
        if len(fds) != 1 or msg != _RANK.pack(peer):
            _close_quietly(fds)
            raise ConnectionError(
                f"rank {rank}: rank {peer} closed the connection without sending its fd"
            )
        return fds[0]


def exchange_fds(fd: int, comm_backend: Any, *, timeout_s: float = EXCHANGE_TIMEOUT_S) -> list:
    """Give ``fd`` to every peer and receive every peer's fd. Collective over ``comm_backend``.

    Returns a list indexed by rank: ``None`` at this rank's own index, elsewhere a new file
    descriptor of this process that refers to what that peer passed in (the caller closes
    them). ``fd`` itself stays open and the caller's.

    How: rank 0 draws a random token and broadcasts it. Every rank listens on the abstract
    Unix socket ``"\\0fusedcomm-peer-memory-<token>-<rank>"`` and serves ``fd`` (with
    ``SCM_RIGHTS``) to each peer from a background thread; once every rank listens, every rank
    connects to each peer in turn and receives its fd. Only processes of the same user are
    served. Each wait is bounded by ``timeout_s``, and a timeout names the peer. If any rank
    fails, every rank raises ``RuntimeError`` and no received fd is left open.
    """
    op = "exchange_fds"
    int_arg(op, "fd", fd, 0)
    backend = _check_backend(op, comm_backend)
    timeout_s = _timeout_arg(op, timeout_s)
    rank, world = backend.Get_rank(), backend.Get_size()
    token = backend.bcast(secrets.token_hex(16) if rank == 0 else None, root=0)
    received: dict[int, int] = {}
    listener: socket.socket | None = None
    server: _FdServer | None = None

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(_socket_name(token, rank))
            sock.listen(max(world, 1))
        except BaseException:
            sock.close()
            raise
        return sock

    def fetch_all() -> None:
        for step in range(1, world):  # rank r starts with r + 1, so the servers share the load
            peer = (rank + step) % world
            received[peer] = _fetch_fd(token, rank, peer, timeout_s)

    try:
        # The agreement after listening is the barrier: every socket exists before any connect.
        listener = local_step(backend, op, "listening for peers", listen)
        server = _FdServer(listener, fd, rank, world, timeout_s)
        server.start()
        local_step(backend, op, "receiving the peers' fds", fetch_all)
        # Every peer holds this rank's fd by now, so the server has finished or is about to.
        local_step(backend, op, "serving this rank's fd", lambda: server.result(timeout_s))
        return [received.get(q) for q in range(world)]
    except BaseException:
        _close_quietly(received.values())
        raise
    finally:
        if server is not None:
            server.stop.set()
            server.join(timeout_s)
        if listener is not None:
            listener.close()


# ------------------------------------------------------------------------------------------
# The mapped rows


def _zero_row(ptr: int, num_bytes: int, device: int) -> None:
    """Zero ``num_bytes`` of device memory at ``ptr`` and wait for it."""
    pack_strided_memory(ptr, num_bytes, num_bytes, 1, torch.uint8, device).zero_()
    torch.cuda.synchronize(device)


class _Pieces:
    """What one creation holds so far; ``release()`` closes, releases and unmaps all of it."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.handles: dict[int, int] = {}  # rank -> allocation handle, until mapped
        self.base: int | None = None
        self.stride = 0
        self.world = 0
        self.device = 0

    def close_fd(self, fd: int) -> None:
        self.fds.remove(fd)
        os.close(fd)

    def release(self) -> list[str]:
        problems: list[str] = []
        fds, self.fds = self.fds, []
        _close_quietly(fds)
        handles, self.handles = list(self.handles.values()), {}
        if handles:
            try:
                _runtime().peer_memory_release(handles)
            except Exception as exc:  # noqa: BLE001 - report, keep releasing
                problems.append(f"releasing the allocations: {exc}")
        if self.base is not None:
            base, self.base = self.base, None
            try:
                _runtime().peer_memory_unmap(self.device, base, self.stride, self.world)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"unmapping the rows: {exc}")
        return problems


def _map_rows(op: str, backend, rank: int, world: int, device: int, size: int, timeout_s: float):
    """Collective: create, exchange, import, map and zero; returns ``(base, row_stride)``."""

    def granularity() -> int:
        return int(_runtime().peer_memory_granularity(device))

    gran = local_step(backend, op, "querying the allocation granularity", granularity)
    asked = backend.allgather((size, gran))
    if any(s != size for s, _ in asked):
        raise ValueError(
            f"{op}: every rank must ask for the same size_per_rank; got {[s for s, _ in asked]} "
            "(by rank)"
        )
    gran = max(g for _, g in asked)  # powers of two: the largest is a multiple of the others
    stride = -(-size // gran) * gran
    pieces = _Pieces()
    pieces.stride, pieces.world, pieces.device = stride, world, device
    try:

        def create() -> None:
            handle, fd = (int(v) for v in _runtime().peer_memory_create(device, stride))
            pieces.handles[rank] = handle
            pieces.fds.append(fd)

        local_step(backend, op, "creating this rank's allocation", create)
        own_fd = pieces.fds[0]
        peer_fds = exchange_fds(own_fd, backend, timeout_s=timeout_s)
        pieces.fds.extend(fd for fd in peer_fds if fd is not None)
        pieces.close_fd(own_fd)  # every peer holds its own copy now

        def import_all() -> None:
            for q, fd in enumerate(peer_fds):
                if fd is not None:
                    pieces.handles[q] = int(_runtime().peer_memory_import(fd))
                    pieces.close_fd(fd)

        local_step(backend, op, "importing the peers' allocations", import_all)

        def map_rows() -> None:
            handles = [pieces.handles[q] for q in range(world)]
            pieces.base = int(_runtime().peer_memory_map(device, handles, stride))
            pieces.handles.clear()  # consumed by the mapping

        local_step(backend, op, "mapping the rows", map_rows)

        def zero_own_row() -> None:
            _zero_row(pieces.base + rank * stride, stride, device)

        local_step(backend, op, "zeroing this rank's row", zero_own_row)
        backend.barrier()  # no rank reads a peer's row before that peer has zeroed it
        return pieces.base, stride
    except BaseException as exc:
        problems = pieces.release()
        if problems and isinstance(exc, Exception):
            exc.add_note(f"{op}: releasing after the failure also failed: " + "; ".join(problems))
        raise


class PeerMemory:
    """One row of device memory per rank, every row mapped on every rank at one stride.

    ``PeerMemory(size_per_rank, comm_backend, device)`` is collective over ``comm_backend``
    (any object with ``Get_rank``, ``Get_size``, ``allgather``, ``bcast`` and ``barrier``,
    such as :class:`~fusedcomm.runtime.comm_backend.TorchDistBackend`); each process of the
    group uses its own GPU ``device`` (default: the current one) on the same node. Every rank
    must ask for the same ``size_per_rank``. On return every row is zero and mapped for reads
    and writes on every rank. If a step fails on any rank, every rank raises ``RuntimeError``
    and keeps nothing allocated, mapped or open.

    Attributes: ``rank`` and ``world`` (inside the backend), ``device``, ``size_per_rank`` (as
    asked), ``row_stride`` (bytes between rows: ``size_per_rank`` rounded up to the driver's
    allocation granularity) and ``base_ptr`` (the address of row 0 on this rank). ``timeout_s``
    bounds each wait for a peer while the file descriptors are exchanged.

    :meth:`close` unmaps the rows on this rank only (each rank closes its own). A row's memory
    is freed once every rank has unmapped it.
    """

    def __init__(
        self,
        size_per_rank: int,
        comm_backend: Any,
        device: int | None = None,
        *,
        timeout_s: float = EXCHANGE_TIMEOUT_S,
    ):
        op = "PeerMemory"
        self._base: int | None = None  # set last, so close() and __del__ work whatever fails
        self.size_per_rank = int_arg(op, "size_per_rank", size_per_rank, 1)
        backend = _check_backend(op, comm_backend)
        if device is None:
            require_cuda(op)
            device = torch.cuda.current_device()
        self.device = int_arg(op, "device", device, 0)
        timeout_s = _timeout_arg(op, timeout_s)
        self.rank, self.world = backend.Get_rank(), backend.Get_size()
        self._base, self.row_stride = _map_rows(
            op, backend, self.rank, self.world, self.device, self.size_per_rank, timeout_s
        )

    @property
    def closed(self) -> bool:
        return self._base is None

    @property
    def base_ptr(self) -> int:
        """The device address of row 0 (rank 0's memory) on this rank."""
        return self._live("base_ptr")

    def row_ptr(self, q: int) -> int:
        """The device address, on this rank, of rank ``q``'s row."""
        base = self._live("row_ptr")
        int_arg("PeerMemory.row_ptr", "q", q, 0)
        if q >= self.world:
            raise ValueError(f"PeerMemory.row_ptr: q ({q}) must be < world ({self.world})")
        return base + q * self.row_stride

    def as_tensor(self) -> torch.Tensor:
        """The rows as ``uint8 [world, size_per_rank]`` with strides ``(row_stride, 1)``.

        The tensor does not own the memory: it must not be used after :meth:`close` (or after
        this object is garbage-collected), so keep this object alive as long as the tensor and
        every view of it.
        """
        base = self._live("as_tensor")
        return pack_strided_memory(
            base, self.size_per_rank, self.row_stride, self.world, torch.uint8, self.device
        )

    def close(self) -> None:
        """Unmap every row on this rank (waits for the device first). Later calls do nothing."""
        if self._base is None:
            return
        base, self._base = self._base, None
        _runtime().peer_memory_unmap(self.device, base, self.row_stride, self.world)

    def __enter__(self) -> PeerMemory:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_base", None) is not None:
                self.close()
        except Exception:  # noqa: BLE001 - best effort at collection or interpreter exit
            pass

    def _live(self, what: str) -> int:
        if self._base is None:
            raise RuntimeError(f"PeerMemory.{what}: the memory is closed")
        return self._base

    def __repr__(self) -> str:
        state = "closed" if self._base is None else f"base={self._base:#x}"
        return (
            f"PeerMemory(rank={self.rank}, world={self.world}, device={self.device}, "
            f"size_per_rank={self.size_per_rank}, row_stride={self.row_stride}, {state})"
        )


def peer_memory_workspace(
    size_per_rank: int, comm_backend: Any, device: int | None = None
) -> tuple[PeerMemory, torch.Tensor]:
    """For engines: a :class:`PeerMemory` and its ``uint8 [W, size_per_rank]`` tensor.

    Collective, like ``PeerMemory(...)``. The tensor does not keep the memory alive: hold the
    returned :class:`PeerMemory` for as long as the tensor (or any view of it) is used, and
    drop the tensor before calling its ``close()``.
    """
    memory = PeerMemory(size_per_rank, comm_backend, device)
    return memory, memory.as_tensor()
