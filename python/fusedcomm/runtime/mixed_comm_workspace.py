"""The mixed-communication topology, its mode rules and the fused modes' peer-memory rows.

Pure parts (no GPU): :class:`MixedTopology` (how a world rank splits into local / inter and TP /
DP indices, §12), the valid op and mode lists, the AUTOTUNE byte ladder and its lookup, and
:class:`MixedCommLayout`, the byte layout of one rank's row. ``W`` = local size, ``G`` =
:data:`MIXED_MAX_BLOCKS`, ``S`` = :data:`MIXED_SLOT_BYTES`, ``A(x)`` = ``x`` rounded up to 128::

    field                             offset            bytes
    abort marks (uint32 [8])          0                 32       ([p] written by rank p)
    block state (uint32 [G][8])       128               32 G     (own: round counter, used packs)
    Lamport slots [3][G][2][W]        A(128 + 32 G)     6 G W S  ([k][b][phase][sender])

The slots start (and are left after every round) holding the Lamport sentinel -0.0 (0x8000).
Everything depends on ``W`` alone, so every rank sizes the same row. The numbers mirror
``include/fusedcomm/layout/mixed_comm.cuh``; the module's describe() hands the C++ values over
and the handler checks them against these.
"""

from __future__ import annotations

import enum
import math
import operator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AUTOTUNE_BASE_BYTES",
    "MIXED_MAX_BLOCKS",
    "MIXED_SLOT_BYTES",
    "MixedCommLayout",
    "MixedCommMode",
    "MixedCommOp",
    "MixedTopology",
    "autotune_index",
    "autotune_ladder",
    "valid_modes",
    "valid_ops",
]

MIXED_MAX_BLOCKS = 128  # MixedCommLayout::kMaxBlocks
MIXED_SLOT_BYTES = 8192  # MixedCommLayout::kSlotBytes
MIXED_MAX_LOCAL = 8  # MixedCommLayout::kMaxLocal
_ALIGN = 128
AUTOTUNE_BASE_BYTES = 8192


class MixedCommOp(enum.IntEnum):
    """The collectives of the mixed-communication family (values of §2.7)."""

    ALLREDUCE = 0
    ALLGATHER = 1
    REDUCESCATTER = 2
    ALLREDUCE_ALLGATHER = 3
    REDUCESCATTER_ALLREDUCE = 4


class MixedCommMode(enum.IntEnum):
    """How a mixed collective runs (values of §2.7). ``_MC`` modes use NVLink multicast and
    are never valid here; ``_UC`` modes are fused kernels on unicast peer memory."""

    FUSED_OPT_WAITS_MC = 0
    FUSED_OPT_WAITS_UC = 1
    FUSED_OPT_BYTES1_MC = 2
    FUSED_OPT_BYTES1_UC = 3
    FUSED_OPT_BYTES2_MC = 4
    FUSED_OPT_BYTES2_UC = 5
    NCCL_ONE = 6
    NCCL_TP_DP = 7
    AUTOTUNE = 8


FUSED_MODES = (MixedCommMode.FUSED_OPT_WAITS_UC, MixedCommMode.FUSED_OPT_BYTES1_UC)
SCATTER_OPS = (MixedCommOp.REDUCESCATTER, MixedCommOp.REDUCESCATTER_ALLREDUCE)


def _int(op: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got bool ({value!r})")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{op}: {name} must be an int, got {type(value).__name__} ({value!r})"
        ) from None
    if value < minimum:
        raise ValueError(f"{op}: {name} ({value}) must be >= {minimum}")
    return value


def _split(op: str, size: int, tp: Any, dp: Any, what: str) -> tuple[int, int]:
    """(tp, dp) of a group of ``size`` ranks; None takes the default (tp = size, dp = 1)."""
    if tp is None and dp is None:
        return size, 1
    if tp is None:
        dp = _int(op, f"{what}_dp_size", dp, 1)
        if size % dp:
            raise ValueError(f"{op}: {what}_dp_size ({dp}) must divide {what}_size ({size})")
        return size // dp, dp
    tp = _int(op, f"{what}_tp_size", tp, 1)
    if dp is None:
        if size % tp:
            raise ValueError(f"{op}: {what}_tp_size ({tp}) must divide {what}_size ({size})")
        return tp, size // tp
    dp = _int(op, f"{what}_dp_size", dp, 1)
    if tp * dp != size:
        raise ValueError(
            f"{op}: {what}_tp_size * {what}_dp_size ({tp} * {dp}) must equal {what}_size ({size})"
        )
    return tp, dp


@dataclass(frozen=True)
class MixedTopology:
    """One rank's place in the mixed layout (§12)::

    world_rank = inter_rank * local_size + local_rank
    local_rank = local_tp_rank + local_dp_rank * local_tp_size
    inter_rank = inter_tp_rank + inter_dp_rank * inter_tp_size
    tp_rank = local_tp_rank + inter_tp_rank * local_tp_size
    dp_rank = local_dp_rank + inter_dp_rank * local_dp_size
    """

    world_rank: int
    world_size: int
    local_rank: int
    local_size: int
    inter_rank: int
    inter_size: int
    local_tp_size: int
    local_dp_size: int
    inter_tp_size: int
    inter_dp_size: int

    @classmethod
    def make(
        cls,
        world_rank: Any,
        world_size: Any,
        local_rank: Any,
        local_size: Any,
        inter_rank: Any,
        inter_size: Any,
        local_tp_size: Any = None,
        local_dp_size: Any = None,
        inter_tp_size: Any = None,
        inter_dp_size: Any = None,
        op: str = "MixedCommHandler",
    ) -> MixedTopology:
        world_size = _int(op, "world_size", world_size, 1)
        local_size = _int(op, "local_size", local_size, 1)
        inter_size = _int(op, "inter_size", inter_size, 1)
        world_rank = _int(op, "world_rank", world_rank, 0)
        local_rank = _int(op, "local_rank", local_rank, 0)
        inter_rank = _int(op, "inter_rank", inter_rank, 0)
        if local_size < 2:
            raise ValueError(f"{op}: local_size ({local_size}) must be > 1")
        if world_size != inter_size * local_size:
            raise ValueError(
                f"{op}: world_size ({world_size}) must equal inter_size * local_size "
                f"({inter_size} * {local_size})"
            )
        if local_rank >= local_size or inter_rank >= inter_size:
            raise ValueError(
                f"{op}: local_rank ({local_rank}) must be < local_size ({local_size}) and "
                f"inter_rank ({inter_rank}) < inter_size ({inter_size})"
            )
        if world_rank != inter_rank * local_size + local_rank:
            raise ValueError(
                f"{op}: world_rank ({world_rank}) must equal inter_rank * local_size + "
                f"local_rank ({inter_rank} * {local_size} + {local_rank})"
            )
        ltp, ldp = _split(op, local_size, local_tp_size, local_dp_size, "local")
        itp, idp = _split(op, inter_size, inter_tp_size, inter_dp_size, "inter")
        return cls(world_rank, world_size, local_rank, local_size, inter_rank, inter_size,
                   ltp, ldp, itp, idp)  # fmt: skip

    def of(self, world_rank: int) -> tuple[int, int]:
        """(tp_rank, dp_rank) of any world rank."""
        inter, local = divmod(world_rank, self.local_size)
        ldp, ltp = divmod(local, self.local_tp_size)
        idp, itp = divmod(inter, self.inter_tp_size)
        return ltp + itp * self.local_tp_size, ldp + idp * self.local_dp_size

    @property
    def tp_rank(self) -> int:
        return self.of(self.world_rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.of(self.world_rank)[1]

    @property
    def local_tp_rank(self) -> int:
        return self.local_rank % self.local_tp_size

    @property
    def local_dp_rank(self) -> int:
        return self.local_rank // self.local_tp_size

    @property
    def tp_size(self) -> int:
        return self.local_tp_size * self.inter_tp_size

    @property
    def dp_size(self) -> int:
        return self.local_dp_size * self.inter_dp_size

    @property
    def mixed(self) -> bool:
        return self.tp_size > 1 and self.dp_size > 1

    def tp_groups(self) -> list[list[int]]:
        """World ranks of every TP group (one per dp_rank, in dp order), each in tp order."""
        return [
            sorted(w for w in range(self.world_size) if self.of(w)[1] == d)
            for d in range(self.dp_size)
        ]

    def dp_groups(self) -> list[list[int]]:
        """World ranks of every DP group (one per tp_rank, in tp order), each in dp order."""
        return [
            sorted(w for w in range(self.world_size) if self.of(w)[0] == t)
            for t in range(self.tp_size)
        ]


def valid_ops(topo: MixedTopology) -> list[MixedCommOp]:
    """The ops of a layout: the mixed pair when both TP and DP are > 1, else AR (TP only) or
    AG and RS (DP only)."""
    if topo.mixed:
        return [MixedCommOp.ALLREDUCE_ALLGATHER, MixedCommOp.REDUCESCATTER_ALLREDUCE]
    if topo.tp_size > 1:
        return [MixedCommOp.ALLREDUCE]
    return [MixedCommOp.ALLGATHER, MixedCommOp.REDUCESCATTER]


def valid_modes(topo: MixedTopology, use_autotune: bool, fused: bool) -> list[MixedCommMode]:
    """The modes of a layout, in value order. ``fused``: whether the fused unicast kernels can
    run here (one node, a GPU that builds them); multicast is never enabled, so no ``_MC``
    mode is ever listed, and OPT_BYTES2 (inter-node TP) needs more than one node."""
    modes = []
    if fused:
        modes.append(MixedCommMode.FUSED_OPT_WAITS_UC)
        if topo.local_tp_size > 1:
            modes.append(MixedCommMode.FUSED_OPT_BYTES1_UC)
    modes.append(MixedCommMode.NCCL_ONE)
    if topo.mixed:
        modes.append(MixedCommMode.NCCL_TP_DP)
    if use_autotune:
        modes.append(MixedCommMode.AUTOTUNE)
    return modes


def autotune_ladder(dp_size: int) -> list[int]:
    """Local byte sizes AUTOTUNE measures: ``8192 * 2**i`` for ``i < max(15 -
    floor(log2(dp_size)), 1)``."""
    count = max(15 - int(math.floor(math.log2(dp_size))), 1)
    return [AUTOTUNE_BASE_BYTES << i for i in range(count)]


def autotune_index(local_bytes: int, ladder_size: int) -> int:
    """The ladder rung of a call of ``local_bytes`` (bytes of x_in, divided by dp_size for the
    reduce-scatter ops): ``round(log2(bytes / 8192))`` clamped to the ladder."""
    if local_bytes <= AUTOTUNE_BASE_BYTES:
        return 0
    coef = math.log2(local_bytes / AUTOTUNE_BASE_BYTES)
    return min(max(round(coef), 0), ladder_size - 1)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class MixedCommLayout:
    """Byte offsets of one rank's row (the table in the module docstring)."""

    local_size: int

    def __post_init__(self) -> None:
        if not 2 <= self.local_size <= MIXED_MAX_LOCAL:
            raise ValueError(
                f"MixedCommLayout: local_size ({self.local_size}) must be in [2, {MIXED_MAX_LOCAL}]"
            )

    abort_marks = 0
    block_state = _ALIGN

    @property
    def slots(self) -> int:
        return _align(self.block_state + 32 * MIXED_MAX_BLOCKS)

    @property
    def size_per_rank(self) -> int:
        return self.slots + 3 * MIXED_MAX_BLOCKS * 2 * self.local_size * MIXED_SLOT_BYTES
