"""The decode context-parallel all-to-all workspace: its layout, its size and its allocation.

Every rank owns one row of bytes that every peer maps; the workspace tensor is ``int64
[cp_size, size_per_rank / 8]`` (row ``q`` = rank ``q``'s memory; the row stride may exceed the
row length). ``W`` = cp_size, ``C`` = :data:`DCP_A2A_CHANNELS`, ``A(x)`` = ``x`` rounded up to
128 bytes::

    field                          offset               bytes
    sequence numbers (uint64 [C])  0                    8C     (own: rounds done per channel)
    abort marks (uint32 [W])       8C                   4W     ([p] written by rank p)
    ready flags (uint32 [C,2,W])   A(8C + 4W)           8CW    ([c, b, p] written by sender p)
    ack flags (uint32 [C,2,W])     A(ready + 8CW)       8CW    ([c, b, q] written by receiver q)
    chunk buffers ([C,2,W] chunks) A(ack + 8CW)         2CW * DCP_A2A_CHUNK_BYTES

The size depends on ``cp_size`` alone (not on the GPU), so every rank asks for the same row
(the allocation checks that too). :class:`DcpA2ALayout` and :class:`DcpA2APlan` mirror
``include/fusedcomm/layout/dcp_a2a.cuh`` number for number; ``tests/test_dcp_a2a_api.py``
compiles that header and compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._checks import int_arg

__all__ = [
    "DCP_A2A_CHANNELS",
    "DCP_A2A_CHUNK_BYTES",
    "DCP_A2A_MAX_CP_SIZE",
    "DcpA2AError",
    "DcpA2ALayout",
    "DcpA2APlan",
    "DcpA2ATypeError",
    "DcpA2AValueError",
    "decode_cp_a2a_allocate_mnnvl_workspace",
    "decode_cp_a2a_workspace_size",
]

DCP_A2A_CHANNELS = 32  # DcpA2ALayout::kChannels
DCP_A2A_CHUNK_BYTES = 16384  # DcpA2ALayout::kChunkBytes
DCP_A2A_MAX_CP_SIZE = 64  # DcpA2ALayout::kMaxCpSize
_ALIGN = 128


class DcpA2AError(RuntimeError):
    """Base of the DCP all-to-all argument errors (RuntimeErrors, as other implementations of
    this API raise RuntimeError for every bad argument)."""


class DcpA2AValueError(DcpA2AError, ValueError):
    """A DCP all-to-all argument has a bad value or shape. Also a ValueError."""


class DcpA2ATypeError(DcpA2AError, TypeError):
    """A DCP all-to-all argument has a bad type or dtype. Also a TypeError."""


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _int(op: str, name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    errors = (DcpA2ATypeError, DcpA2AValueError)
    return int_arg(op, name, value, minimum, maximum, index=True, errors=errors)


def _cp_size(op: str, cp_size: Any) -> int:
    return _int(op, "cp_size", cp_size, 1, DCP_A2A_MAX_CP_SIZE)


@dataclass(frozen=True)
class DcpA2ALayout:
    """Byte offsets of one rank's row (the table in the module docstring)."""

    cp_size: int

    def __post_init__(self) -> None:
        _cp_size("DcpA2ALayout", self.cp_size)

    sequence = 0
    abort_marks = 8 * DCP_A2A_CHANNELS

    @property
    def flag_bytes(self) -> int:
        return 4 * 2 * DCP_A2A_CHANNELS * self.cp_size

    @property
    def ready_flags(self) -> int:
        return _align(self.abort_marks + 4 * self.cp_size)

    @property
    def ack_flags(self) -> int:
        return _align(self.ready_flags + self.flag_bytes)

    @property
    def buffers(self) -> int:
        return _align(self.ack_flags + self.flag_bytes)

    @property
    def size_per_rank(self) -> int:
        return self.buffers + 2 * DCP_A2A_CHANNELS * self.cp_size * DCP_A2A_CHUNK_BYTES

    def slot(self, channel: int, parity: int, rank: int) -> int:
        return (channel * 2 + parity) * self.cp_size + rank

    def buffer(self, channel: int, parity: int, rank: int) -> int:
        return self.buffers + self.slot(channel, parity, rank) * DCP_A2A_CHUNK_BYTES


@dataclass(frozen=True)
class DcpA2APlan:
    """How a call's ``entries`` (the flattened leading index) spread over the channels: units
    of ``per_unit`` consecutive entries, unit ``u`` on channel ``u % channels`` (one thread
    block each; at most :meth:`max_channels` of the CP size). ``per_unit`` is 0 when there is nothing to do or one entry does not fit a
    chunk."""

    entries: int
    entry_bytes: int
    per_unit: int
    units: int
    channels: int

    @staticmethod
    def max_channels(cp_size: int) -> int:
        """Thread blocks a call uses at most: fewer for large groups, so the kernels of every
        rank fit one GPU at once when ranks share it."""
        return max(4, min(DCP_A2A_CHANNELS, 128 // cp_size))

    @classmethod
    def make(cls, n: int, o_bytes: int, s_bytes: int, cp_size: int) -> DcpA2APlan:
        entry = o_bytes + s_bytes
        fit = DCP_A2A_CHUNK_BYTES // entry if entry > 0 else 0
        most = cls.max_channels(cp_size)
        spread = -(-n // most)
        per = 0 if n <= 0 or fit < 1 else max(1, min(spread, fit))
        units = -(-n // per) if per else 0
        return cls(n, entry, per, units, min(units, most))

    def rounds(self, channel: int) -> int:
        """Rounds of ``channel`` in this call."""
        if channel >= self.units:
            return 0
        return (self.units - channel + self.channels - 1) // self.channels


def decode_cp_a2a_workspace_size(cp_size: int) -> int:
    """Bytes per rank of a DCP all-to-all workspace for a CP group of ``cp_size`` ranks (1 to
    64): flags plus two chunk buffers of 16 KiB per (channel, sender), 32 channels. It depends
    on ``cp_size`` alone, so every rank of the group computes the same number. Pure."""
    return DcpA2ALayout(_cp_size("decode_cp_a2a_workspace_size", cp_size)).size_per_rank


def _cp_backend(mapping: Any, mnnvl_config: Any):
    """A comm backend over this rank's CP group (ranks with this rank's pp and tp ranks,
    ordered by cp_rank)."""
    from .comm_backend import MPIBackend, SoloBackend, TorchDistBackend

    if mapping.cp_size == 1:
        return SoloBackend()
    if mnnvl_config is not None and mnnvl_config.comm_backend is not None:
        world = mnnvl_config.comm_backend
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        world = TorchDistBackend()
    else:
        world = MPIBackend()
    if world.Get_size() == mapping.cp_size:
        return world if world.Get_rank() == mapping.cp_rank else world.Split(0, mapping.cp_rank)
    color = mapping.pp_rank * mapping.tp_size + mapping.tp_rank
    return world.Split(color, mapping.cp_rank)


# Allocations that must outlive every workspace tensor made from them (the tensors do not own
# their memory); dropped only when the process exits.
_KEEP_ALIVE: list[Any] = []


def decode_cp_a2a_allocate_mnnvl_workspace(
    mapping: Any, *, mnnvl_config: Any = None
) -> torch.Tensor:
    """Allocate the workspace of this rank's CP group: ``int64 [cp_size, size / 8]``.

    Collective over the CP group of ``mapping`` (the ranks sharing this rank's ``pp_rank`` and
    ``tp_rank``, ordered by ``cp_rank``): each rank creates its row on its current GPU and maps
    every peer's row, all at one stride (``fusedcomm.runtime.peer_memory``: CUDA virtual memory
    shared through POSIX file descriptors; unicast mappings only). Handles travel over
    ``mnnvl_config.comm_backend`` when given, else torch.distributed (when initialised), else
    MPI. Every rank must ask for the same size (checked). Rows start zeroed; still call
    :func:`~fusedcomm.decode_cp_a2a_init_workspace` on every rank and a barrier before the
    first all-to-all. The memory stays mapped for the life of the process.
    """
    op = "decode_cp_a2a_allocate_mnnvl_workspace"
    for attr in ("cp_size", "cp_rank", "pp_rank", "tp_rank", "tp_size"):
        if not hasattr(mapping, attr):
            raise DcpA2ATypeError(f"{op}: mapping must be a Mapping (it has no {attr})")
    cp_size = _cp_size(op, mapping.cp_size)
    cp_rank = _int(op, "mapping.cp_rank", mapping.cp_rank, 0, cp_size - 1)
    size = decode_cp_a2a_workspace_size(cp_size)
    if cp_size == 1:
        return torch.zeros(1, size // 8, dtype=torch.int64, device="cuda")
    from ..dlpack_utils import pack_strided_memory
    from .peer_memory import PeerMemory

    backend = _cp_backend(mapping, mnnvl_config)
    if backend.Get_size() != cp_size or backend.Get_rank() != cp_rank:
        raise DcpA2AValueError(
            f"{op}: the comm backend has rank {backend.Get_rank()} of {backend.Get_size()}, the "
            f"mapping's CP group rank {cp_rank} of {cp_size}"
        )
    memory = PeerMemory(size, backend)
    _KEEP_ALIVE.append(memory)
    workspace = pack_strided_memory(
        memory.base_ptr, size, memory.row_stride, cp_size, torch.int64, memory.device
    )
    workspace._fusedcomm_peer_memory = memory  # noqa: SLF001 - keeps the mapping with the tensor
    return workspace
