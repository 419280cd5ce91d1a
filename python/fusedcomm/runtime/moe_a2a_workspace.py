"""The MoE all-to-all workspace: its layout, sizes, metainfo and typed views into it.

Every rank owns one row of bytes that every peer maps; the workspace tensor is ``uint8
[ep_size, size_per_rank]`` (row ``q`` = rank ``q``'s memory, the row stride may exceed the row
length). A row starts with the auxiliary fields (flags, counters, the top-k tables of the last
dispatch, optional EPLB statistics), followed by the payload data. ``A(x)`` = ``x`` rounded up
to 128 bytes; ``W`` = ep_size, ``M`` = max_num_tokens, ``n`` = eplb_stats_num_experts::

    field                        offset              bytes
    flag value (uint32)          0                   4
    local token counter (int32)  4                   4
    send counters (int32 [W])    8                   4W
    recv counters (int32 [W])    8 + 4W              4W
    dispatch completion flags    A(8 + 8W)           4W
    combine completion flags     A(previous + 4W)    4W
    top-k target ranks           A(previous + 4W)    4 * 22 * M   (int32 [M, 22])
    top-k send indices           A(previous + 88M)   4 * 22 * M
    EPLB gathered stats          A(previous + 88M)   4Wn          (int32 [W, n])
    payload data                 A(previous + 4Wn)   the rest

During one round (``R`` = runtime_max_tokens_per_rank) dispatch payload ``i`` occupies
``W * R * bytes_i`` bytes from its base, the payloads back to back from the payload data, and
the combine region ``[W, R, combine bytes]`` starts at ``A(end of the dispatch payloads)``.

:class:`MoeA2ALayout` mirrors ``include/fusedcomm/layout/moe_a2a.cuh`` (the struct the kernels
and the host code use) number for number; ``tests/test_moe_a2a_layout.py`` compiles that header
and compares every offset and size with this module. Everything here is pure: no device work,
and the views work on CPU tensors as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import int_arg

__all__ = [
    "MOE_A2A_MAX_EP_SIZE",
    "MOE_A2A_MAX_PAYLOADS",
    "MOE_A2A_MAX_TOP_K",
    "MoeA2ALayout",
    "moe_a2a_get_workspace_size_per_rank",
    "moe_a2a_metainfo",
    "moe_a2a_wrap_payload_tensor_in_workspace",
    "moe_workspace_size_per_rank",
]

MOE_A2A_MAX_TOP_K = 22  # columns of the top-k tables (MoeA2ALayout::kMaxTopK)
MOE_A2A_MAX_EP_SIZE = 64  # MoeA2ALayout::kMaxEpSize
MOE_A2A_MAX_PAYLOADS = 6  # MoeA2ALayout::kMaxPayloads
_ALIGN = 128
# Metainfo entries in order; the EPLB entry is present only with an EPLB region.
METAINFO_FIELDS = (
    "FLAG_VAL",
    "LOCAL_TOKEN_COUNTER",
    "SEND_COUNTERS",
    "RECV_COUNTERS",
    "DISPATCH_COMPLETION_FLAGS",
    "COMBINE_COMPLETION_FLAGS",
    "TOPK_TARGET_RANKS",
    "TOPK_SEND_INDICES",
    "EPLB_GATHERED_STATS",
    "PAYLOAD_DATA",
)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _int(op: str, name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    return int_arg(op, name, value, minimum, maximum, index=True)


@dataclass(frozen=True)
class MoeA2ALayout:
    """Byte offsets of one rank's row (the table in the module docstring).

    ``ep_size`` in [1, 64], ``max_num_tokens`` >= 1, ``eplb_stats_num_experts`` >= 0 (0: no
    EPLB region). Each offset property has the name of the C++ accessor.
    """

    ep_size: int
    max_num_tokens: int
    eplb_stats_num_experts: int = 0

    def __post_init__(self) -> None:
        op = "MoeA2ALayout"
        _int(op, "ep_size", self.ep_size, 1, MOE_A2A_MAX_EP_SIZE)
        _int(op, "max_num_tokens", self.max_num_tokens, 1)
        _int(op, "eplb_stats_num_experts", self.eplb_stats_num_experts, 0)

    flag_value = 0
    local_token_counter = 4
    send_counters = 8

    @property
    def recv_counters(self) -> int:
        return 8 + 4 * self.ep_size

    @property
    def dispatch_completion_flags(self) -> int:
        return _align(self.recv_counters + 4 * self.ep_size)

    @property
    def combine_completion_flags(self) -> int:
        return _align(self.dispatch_completion_flags + 4 * self.ep_size)

    @property
    def topk_table_bytes(self) -> int:
        return 4 * MOE_A2A_MAX_TOP_K * self.max_num_tokens

    @property
    def topk_target_ranks(self) -> int:
        return _align(self.combine_completion_flags + 4 * self.ep_size)

    @property
    def topk_send_indices(self) -> int:
        return _align(self.topk_target_ranks + self.topk_table_bytes)

    @property
    def eplb_gathered_stats(self) -> int:
        return _align(self.topk_send_indices + self.topk_table_bytes)

    @property
    def eplb_stats_bytes(self) -> int:
        return 4 * self.ep_size * self.eplb_stats_num_experts

    @property
    def payload_data(self) -> int:
        """``PAYLOAD_DATA_OFFSET``: the auxiliary fields' size, 128-aligned."""
        return _align(self.eplb_gathered_stats + self.eplb_stats_bytes)

    def metainfo(self) -> tuple[int, ...]:
        """The offsets in metainfo order: 9 entries, 10 with an EPLB region."""
        entries = [
            self.flag_value,
            self.local_token_counter,
            self.send_counters,
            self.recv_counters,
            self.dispatch_completion_flags,
            self.combine_completion_flags,
            self.topk_target_ranks,
            self.topk_send_indices,
        ]
        if self.eplb_stats_num_experts > 0:
            entries.append(self.eplb_gathered_stats)
        entries.append(self.payload_data)
        return tuple(entries)

    def size_per_rank(self, dispatch_bytes: int, combine_bytes: int) -> int:
        """Bytes of one row for rounds of up to ``M`` tokens per rank, ``dispatch_bytes`` (all
        dispatch payloads together) and ``combine_bytes`` per token."""
        slots = self.ep_size * self.max_num_tokens
        return self.payload_data + _align(slots * dispatch_bytes) + _align(slots * combine_bytes)

    def dispatch_payload_offsets(
        self, runtime_max_tokens: int, payload_bytes: Sequence[int]
    ) -> list[int]:
        """Where each dispatch payload of a round starts in the row (``MoeA2ARound``)."""
        slots = self.ep_size * runtime_max_tokens
        offsets, offset = [], self.payload_data
        for nbytes in payload_bytes:
            offsets.append(offset)
            offset += slots * nbytes
        return offsets

    def combine_payload_offset(self, runtime_max_tokens: int, payload_bytes: Sequence[int]) -> int:
        """``combine_payload_offset`` of a round: ``A(end of the dispatch payloads)``."""
        end = self.payload_data + self.ep_size * runtime_max_tokens * sum(payload_bytes)
        return _align(end)


def moe_a2a_get_workspace_size_per_rank(
    ep_size: int,
    max_num_tokens: int,
    total_dispatch_payload_size_per_token: int,
    combine_payload_size_per_token: int,
    eplb_stats_num_experts: int = 0,
) -> int:
    """Bytes per rank of a MoE all-to-all workspace.

    ``A(aux) + A(W * M * dispatch) + A(W * M * combine)``, with ``aux`` = the payload data
    offset of the row layout, ``W`` = ``ep_size`` (1..64), ``M`` = ``max_num_tokens`` (the most
    tokens any rank dispatches in one round), ``dispatch`` = the bytes of all dispatch payloads
    of one token together and ``combine`` = the bytes of one token's combine payload. Pure.
    """
    op = "moe_a2a_get_workspace_size_per_rank"
    ep_size = _int(op, "ep_size", ep_size, 1, MOE_A2A_MAX_EP_SIZE)
    max_num_tokens = _int(op, "max_num_tokens", max_num_tokens, 1)
    dispatch = _int(
        op, "total_dispatch_payload_size_per_token", total_dispatch_payload_size_per_token, 0
    )
    combine = _int(op, "combine_payload_size_per_token", combine_payload_size_per_token, 0)
    eplb = _int(op, "eplb_stats_num_experts", eplb_stats_num_experts, 0)
    return MoeA2ALayout(ep_size, max_num_tokens, eplb).size_per_rank(dispatch, combine)


def moe_workspace_size_per_rank(
    ep_size: int,
    top_k: int,
    max_num_tokens: int,
    hidden_size: int,
    extra_payload_bytes_per_token: int = 0,
    eplb_stats_num_experts: int = 0,
) -> int:
    """Bytes per rank for the usual payloads (``MoeAlltoAll.get_moe_workspace_size_per_rank``).

    Assumes 16-bit hidden states, int32 expert ids and fp32 router weights in the dispatch
    (``2 * hidden_size + 4 * top_k + 4 * top_k + extra_payload_bytes_per_token`` bytes per
    token) and 16-bit combine payloads (``2 * hidden_size``); see
    :func:`moe_a2a_get_workspace_size_per_rank`. Pure.
    """
    op = "get_moe_workspace_size_per_rank"
    top_k = _int(op, "top_k", top_k, 1, MOE_A2A_MAX_TOP_K)
    hidden_size = _int(op, "hidden_size", hidden_size, 1)
    extra = _int(op, "extra_payload_bytes_per_token", extra_payload_bytes_per_token, 0)
    dispatch = 2 * hidden_size + 4 * top_k + 4 * top_k + extra
    return moe_a2a_get_workspace_size_per_rank(
        ep_size, max_num_tokens, dispatch, 2 * hidden_size, eplb_stats_num_experts
    )


def moe_a2a_metainfo(
    ep_size: int, max_num_tokens: int, eplb_stats_num_experts: int = 0
) -> torch.Tensor:
    """The metainfo tensor: CPU int64 byte offsets of the row's fields, in the order
    FLAG_VAL, LOCAL_TOKEN_COUNTER, SEND_COUNTERS, RECV_COUNTERS, DISPATCH_COMPLETION_FLAGS,
    COMBINE_COMPLETION_FLAGS, TOPK_TARGET_RANKS, TOPK_SEND_INDICES, [EPLB_GATHERED_STATS,]
    PAYLOAD_DATA. The EPLB entry is present only when ``eplb_stats_num_experts > 0`` (9 entries
    otherwise, 10 with it). Callers treat it as opaque; only its equality across calls matters.
    """
    op = "moe_a2a_metainfo"
    layout = MoeA2ALayout(
        _int(op, "ep_size", ep_size, 1, MOE_A2A_MAX_EP_SIZE),
        _int(op, "max_num_tokens", max_num_tokens, 1),
        _int(op, "eplb_stats_num_experts", eplb_stats_num_experts, 0),
    )
    return torch.tensor(layout.metainfo(), dtype=torch.int64)


def moe_a2a_wrap_payload_tensor_in_workspace(
    workspace: torch.Tensor,
    leading_shape: Sequence[int],
    slice_start: int,
    slice_end: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A typed view of bytes ``[slice_start, slice_end)`` of the workspace (no copy).

    ``workspace``: ``uint8 [W, S]`` (rows may be strided, bytes within a row contiguous) or
    ``uint8 [S]`` (one row). Offsets count bytes from the workspace's first byte: the row is
    ``slice_start // workspace.stride(0)``, the start within it the remainder, and the slice
    must end within the same row. Returns the bytes reinterpreted as ``dtype`` and shaped
    ``[*leading_shape, -1]``; writes through the view change the workspace. Raises
    ``ValueError`` when the slice is empty or reversed, leaves its row, does not start at a
    multiple of ``dtype``'s size, or holds a byte count that is not a multiple of ``dtype``'s
    size times the product of ``leading_shape``.
    """
    op = "moe_a2a_wrap_payload_tensor_in_workspace"
    if not isinstance(workspace, torch.Tensor):
        raise TypeError(f"{op}: workspace must be a Tensor, got {type(workspace).__name__}")
    if workspace.dtype != torch.uint8:
        raise TypeError(f"{op}: workspace.dtype ({workspace.dtype}) must be uint8")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{op}: dtype must be a torch.dtype, got {type(dtype).__name__}")
    start = _int(op, "slice_start", slice_start, 0)
    end = _int(op, "slice_end", slice_end, 0)
    if not isinstance(leading_shape, Sequence):
        raise TypeError(
            f"{op}: leading_shape must be a sequence of ints, got {type(leading_shape).__name__}"
        )
    lead = tuple(_int(op, f"leading_shape[{i}]", d, 1) for i, d in enumerate(leading_shape))
    if workspace.dim() == 1:
        rows = workspace.unsqueeze(0)
    elif workspace.dim() == 2:
        rows = workspace
    else:
        raise ValueError(f"{op}: workspace must be [W, S] or [S], got {tuple(workspace.shape)}")
    if rows.size(1) > 1 and rows.stride(1) != 1:
        raise ValueError(f"{op}: workspace rows must be contiguous, stride {rows.stride()}")
    row_len = rows.size(1)
    row_stride = rows.stride(0) if rows.size(0) > 1 else max(row_len, 1)
    if end <= start:
        raise ValueError(f"{op}: slice [{start}, {end}) is empty or reversed")
    row, begin = divmod(start, row_stride)
    stop = end - row * row_stride
    if row >= rows.size(0) or stop > row_len:
        raise ValueError(
            f"{op}: slice [{start}, {end}) must lie within one row of the workspace "
            f"({rows.size(0)} rows of {row_len} bytes, row stride {row_stride}): it starts in "
            f"row {row} at byte {begin} and would end at byte {stop}"
        )
    itemsize = dtype.itemsize
    nbytes = end - start
    per_row = itemsize * math.prod(lead)
    if nbytes % per_row != 0:
        raise ValueError(
            f"{op}: slice of {nbytes} bytes is not a whole number of {dtype} elements "
            f"({itemsize} bytes) times the leading shape {list(lead)}"
        )
    if (rows.storage_offset() + row * rows.stride(0) + begin) % itemsize != 0:
        raise ValueError(
            f"{op}: slice_start ({start}) must be aligned to {dtype}'s size ({itemsize} bytes)"
        )
    return rows[row, begin:stop].view(dtype).view(*lead, -1)
