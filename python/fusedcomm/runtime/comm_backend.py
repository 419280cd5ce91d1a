"""Host-side communicators used to set up shared buffers between ranks.

fusedcomm only needs a handful of small host collectives while it builds a
workspace: exchange handles (all-gather), hand one rank's value to everyone
(broadcast), wait for everyone (barrier) and carve sub-groups out of a group
(split). Any object that offers these operations can be passed as
``comm_backend``. The method names follow mpi4py, so an mpi4py communicator is
accepted as it is.

Two implementations ship here:

* :class:`TorchDistBackend` runs over a ``torch.distributed`` process group.
* :class:`MPIBackend` runs over an mpi4py communicator. mpi4py is imported only
  when an ``MPIBackend`` is built, so ``import fusedcomm`` never needs it.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Protocol, runtime_checkable

import torch.distributed as dist

from .._checks import int_arg

__all__ = [
    "CommBackend",
    "TorchDistBackend",
    "MPIBackend",
    "MnnvlConfig",
    "SoloBackend",
    "allgather_bytes",
    "mpi_barrier",
    "resolve_backend",
]

_MPI4PY_MISSING = "MPIBackend needs mpi4py: pip install mpi4py"


@runtime_checkable
class CommBackend(Protocol):
    """What fusedcomm asks of a host communicator.

    Every method is collective over the communicator's ranks except
    ``Get_rank`` and ``Get_size``. Ranks are numbered inside the communicator.
    """

    def Get_rank(self) -> int:
        """This process's rank inside the communicator."""
        ...

    def Get_size(self) -> int:
        """Number of ranks in the communicator."""
        ...

    def allgather(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), indexed by rank, on every rank."""
        ...

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """``obj`` of rank ``root`` on every rank."""
        ...

    def barrier(self) -> None:
        """Return once every rank has entered the barrier."""
        ...

    def Split(self, color: int, key: int = 0) -> CommBackend:
        """A new communicator per ``color``, ranks ordered by ``(key, old rank)``."""
        ...


def _check_root(op: str, root: int, size: int) -> int:
    if isinstance(root, bool) or not isinstance(root, int):
        raise TypeError(f"{op}: root must be an int, got {type(root).__name__}")
    if not 0 <= root < size:
        raise ValueError(f"{op}: root ({root}) must be in [0, {size})")
    return root


class TorchDistBackend:
    """A :class:`CommBackend` over a ``torch.distributed`` process group.

    ``group`` defaults to the default (WORLD) group. Ranks are ranks inside
    ``group``. Objects travel through ``all_gather_object`` and
    ``broadcast_object_list``, so they must be picklable.

    With an NCCL group the object collectives stage their data on the current
    CUDA device: the caller must select this rank's device
    (``torch.cuda.set_device``) before using the backend. Gloo groups need
    nothing extra.
    """

    def __init__(self, group: Any = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchDistBackend: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() first"
            )
        if group is None:
            group = dist.group.WORLD
        group_rank = -1
        if group is not dist.GroupMember.NON_GROUP_MEMBER:
            group_rank = dist.get_rank(group)
        if group_rank < 0:
            raise ValueError(
                f"TorchDistBackend: this process (global rank {dist.get_rank()}) "
                "is not a member of the given group"
            )
        self._group = group
        self._size = dist.get_world_size(group)
        # _order[r] is the process-group rank of backend rank r (None: the same).
        self._order: list[int] | None = None
        self._rank = group_rank

    @classmethod
    def _ordered(cls, group: Any, order: list[int]) -> TorchDistBackend:
        backend = cls(group)
        if order != sorted(order):
            backend._order = order
            backend._rank = order.index(backend._rank)
        return backend

    @property
    def group(self) -> Any:
        """The underlying process group.

        Its own rank numbering follows global rank order; after a ``Split``
        with reordering keys it can differ from ``Get_rank()``.
        """
        return self._group

    def Get_rank(self) -> int:
        return self._rank

    def Get_size(self) -> int:
        return self._size

    def allgather(self, obj: Any) -> list:
        out: list = [None] * self._size
        dist.all_gather_object(out, obj, group=self._group)
        if self._order is not None:
            out = [out[g] for g in self._order]
        return out

    def bcast(self, obj: Any, root: int = 0) -> Any:
        _check_root("TorchDistBackend.bcast", root, self._size)
        src = self._global_rank(root)
        box = [obj if self._rank == root else None]
        dist.broadcast_object_list(box, src=src, group=self._group)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self._group)

    def Split(self, color: int, key: int = 0) -> TorchDistBackend:
        """Split into one group per ``color``; collective over this group.

        Inside each new backend ranks are ordered by ``(key, rank here)``. The
        process group underneath always numbers its ranks in global order (all
        torch versions support that); the backend maps between the two.

        When this group spans the whole job, every rank creates every new group
        in the same order, as ``torch.distributed.new_group`` requires. When it
        is a proper sub-group, the other processes of the job take no part, so
        each rank builds only its own group with group-local synchronisation;
        that path expects the ranks of each new group to have created the same
        sequence of process groups before, which holds when groups are built
        symmetrically.
        """
        color = int_arg("TorchDistBackend.Split", "color", color)
        key = int_arg("TorchDistBackend.Split", "key", key)
        entries = self.allgather((color, key, dist.get_rank()))
        by_color: dict[int, list[tuple[int, int, int]]] = {}
        for rank, (c, k, global_rank) in enumerate(entries):
            by_color.setdefault(c, []).append((k, rank, global_rank))

        kwargs: dict[str, Any] = {"backend": dist.get_backend(self._group)}
        whole_job = self._size == dist.get_world_size()
        if not whole_job:
            kwargs["use_local_synchronization"] = True
        mine = None
        for c in sorted(by_color):
            if not whole_job and c != color:
                continue
            wanted = [g for _, _, g in sorted(by_color[c])]
            members = sorted(wanted)
            group = dist.new_group(members, **kwargs)
            if c == color:
                mine = self._ordered(group, [members.index(g) for g in wanted])
        return mine

    def _global_rank(self, rank: int) -> int:
        group_rank = rank if self._order is None else self._order[rank]
        if self._group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self._group, group_rank)

    def __repr__(self) -> str:
        return f"TorchDistBackend(rank={self._rank}, size={self._size})"


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(_MPI4PY_MISSING) from exc
    return MPI


class MPIBackend:
    """A :class:`CommBackend` over an mpi4py communicator.

    ``comm`` defaults to ``MPI.COMM_WORLD``. mpi4py (which initialises MPI on
    import) is loaded when the first ``MPIBackend`` is built.
    """

    def __init__(self, comm: Any = None):
        if comm is None:
            comm = _import_mpi().COMM_WORLD
        self._comm = comm

    @property
    def comm(self) -> Any:
        """The underlying mpi4py communicator."""
        return self._comm

    def Get_rank(self) -> int:
        return self._comm.Get_rank()

    def Get_size(self) -> int:
        return self._comm.Get_size()

    def allgather(self, obj: Any) -> list:
        return list(self._comm.allgather(obj))

    def bcast(self, obj: Any, root: int = 0) -> Any:
        _check_root("MPIBackend.bcast", root, self._comm.Get_size())
        return self._comm.bcast(obj, root=root)

    def barrier(self) -> None:
        self._comm.Barrier()

    def Split(self, color: int, key: int = 0) -> MPIBackend:
        color = int_arg("MPIBackend.Split", "color", color)
        key = int_arg("MPIBackend.Split", "key", key)
        return MPIBackend(self._comm.Split(color, key))

    def __repr__(self) -> str:
        return f"MPIBackend(rank={self.Get_rank()}, size={self.Get_size()})"


def mpi_barrier() -> None:
    """Barrier over ``MPI.COMM_WORLD`` (needs mpi4py)."""
    _import_mpi().COMM_WORLD.Barrier()


def allgather_bytes(backend: CommBackend, data: bytes) -> list[bytes]:
    """All-gather one byte string per rank; returns them indexed by rank."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"allgather_bytes: data must be bytes, got {type(data).__name__}")
    gathered = backend.allgather(bytes(data))
    size = backend.Get_size()
    if len(gathered) != size:
        raise RuntimeError(
            f"allgather_bytes: backend returned {len(gathered)} items for {size} ranks"
        )
    return [bytes(item) for item in gathered]


def _agree(backend, op: str, what: str, error: BaseException | None) -> None:
    """Every rank learns whether ``what`` failed on any rank; all raise together if so."""
    note = None if error is None else f"{type(error).__name__}: {error}"
    notes = backend.allgather(note)
    failed = [(r, n) for r, n in enumerate(notes) if n is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {n}" for r, n in failed)
        raise RuntimeError(f"{op}: {what} failed ({detail})") from error


def local_step(backend, op: str, what: str, fn):
    """Run a rank-local step, then agree on its outcome (so no rank waits for a failed peer)."""
    error = None
    result = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - shared with the peers, then re-raised
        error = exc
    _agree(backend, op, what, error)
    return result


def _check_backend(op: str, backend: Any) -> None:
    if not isinstance(backend, CommBackend):
        raise TypeError(
            f"{op}: comm_backend must provide Get_rank, Get_size, allgather, "
            f"bcast, barrier and Split; got {type(backend).__name__}"
        )


def resolve_backend(comm_backend: Any = None, group: Any = None) -> CommBackend:
    """Return ``comm_backend`` if given, else a :class:`TorchDistBackend` over ``group``."""
    if comm_backend is not None:
        _check_backend("resolve_backend", comm_backend)
        return comm_backend
    return TorchDistBackend(group)


class SoloBackend:
    """A communicator of one rank (world size 1): every collective returns at once.

    Objects still make a pickle round trip in ``allgather`` and ``bcast``, as they would between
    processes, so code that works here does not rely on sharing objects by reference.
    """

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def allgather(self, obj: Any) -> list:
        return [pickle.loads(pickle.dumps(obj))]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        _check_root("SoloBackend.bcast", root, 1)
        return pickle.loads(pickle.dumps(obj))

    def barrier(self) -> None:
        return None

    def Split(self, color: int, key: int = 0) -> SoloBackend:
        return self


@dataclasses.dataclass
class MnnvlConfig:
    """Settings for multi-node NVLink (fabric) memory allocations.

    ``comm_backend`` exchanges the fabric handles (default: torch.distributed
    WORLD). ``allocation_granularity`` of 0 asks the driver for its
    recommended granularity. ``fabric_page_size`` is the unit (bytes) that
    allocations are rounded up to.
    """

    comm_backend: CommBackend | None = None
    allocation_granularity: int = 0
    fabric_page_size: int = 1 << 29

    def __post_init__(self) -> None:
        if self.comm_backend is not None:
            _check_backend("MnnvlConfig", self.comm_backend)
        gran = int_arg("MnnvlConfig", "allocation_granularity", self.allocation_granularity)
        if gran < 0:
            raise ValueError(f"MnnvlConfig: allocation_granularity ({gran}) must be >= 0")
        page = int_arg("MnnvlConfig", "fabric_page_size", self.fabric_page_size)
        if page <= 0:
            raise ValueError(f"MnnvlConfig: fabric_page_size ({page}) must be > 0")
