"""The workspace of the legacy ``trtllm_custom_all_reduce``: seven buffer lists that the Lamport
fusion kernels run on.

The caller sees the seven lists of §7, each ``tp_size`` pointers (entry ``q``: rank q's buffer
mapped into this process)::

    [0] comm (ping)   [1] comm (pong)   [2] barrier-in flags   [3] barrier-out flags
    [4] [5] [6] Lamport buffers 0, 1, 2

Underneath, they are five CUDA IPC allocations per rank, laid out so the fusion kernels
(``kernels/allreduce_fusion_oneshot.cuh`` / ``_twoshot.cuh``) take them as they are:

* a comm buffer (ping or pong, whichever the call passes) is the two-shot buffer: the call's
  staged rows, then the reduced rows, ``2 * N * D * elem`` bytes of its
  ``tp_size * max_token_num * hidden_dim * 4``;
* barrier-in holds the kernels' flags (meetings, abort marks, call announcements), so it is the
  larger of the legacy size and the kernels' flag layout; barrier-out keeps its legacy size and
  is not written;
* the three Lamport buffers are three consecutive segments of one allocation (list ``[k]`` is
  segment ``k``), so the one-shot kernel's rotation over three segments is the legacy rotation
  over three buffers. They are filled with the 16-bit sentinel at creation, and callers may
  re-fill them (``trtllm_lamport_initialize_all``) between calls, as the reference's test does.

Plus a rank-local control block (``_fusion_launch.ControlBlock``): the protocol state (which
segment is next, what to clear, the call count) and the failure record. Because that state
lives on the device, calls replay correctly inside CUDA graphs and ``flag_value`` is not needed
to pick buffers or flag values (see docs/legacy-allreduce.md). A call finds its workspace by
its own comm pointer (``peer_comm_buffer_ptrs[tp_rank]``), checks every pointer list against
the workspace and runs on one of two pre-built pointer tables (ping or pong).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from ..enums import MAX_ALL_REDUCE_BLOCKS, MAX_COMM_SIZE, LamportTokenNumThreshold
from . import fusion_control as _fusion_launch
from . import fusion_workspace as fw

__all__ = [
    "LegacyWorkspace",
    "create_legacy_workspace",
    "find_legacy_workspace",
    "trtllm_create_ipc_workspace_for_all_reduce",
]

_MAX_WORLD = 8  # the fusion kernels' kMaxRanks
_POINTER_LISTS = (
    "peer_comm_buffer_ptrs",
    "peer_comm_buffer_ptrs",
    "peer_barrier_ptrs_in",
    "peer_barrier_ptrs_out",
    "lamport_peer_comm_buffer_ptrs_0",
    "lamport_peer_comm_buffer_ptrs_1",
    "lamport_peer_comm_buffer_ptrs_2",
)


@dataclasses.dataclass
class LegacyWorkspace:
    """What this process knows of one legacy workspace (one rank of it).

    ``handles``: the seven pointer lists the creator returned; ``tables``: the fusion pointer
    tables ``[comm_0.., flags_0.., lamport_0.., control]`` over comm buffer 0 (ping) and 1
    (pong); ``control``: the control block (protocol state, failure record); ``backend``: the
    communicator of the creation (the NCCL strategy reduces over its process group);
    ``ones``: RMSNorm weights of 1 for calls without ``weight``, by (dtype, hidden).
    """

    rank: int
    world: int
    max_token_num: int
    hidden_dim: int
    handles: list[list[int]]
    backend: Any
    control: Any = None
    tables: tuple = ()
    ones: dict = dataclasses.field(default_factory=dict)

    @property
    def capacity(self) -> int:
        """Elements per call (``max_token_num * hidden_dim``)."""
        return self.max_token_num * self.hidden_dim

    def close(self) -> None:
        """Forget the workspace in this process and free the control block (once)."""
        for k in range(2 if self.handles else 0):  # no handles: creation failed before them
            if _BY_COMM.get(self.handles[k][self.rank]) is self:
                del _BY_COMM[self.handles[k][self.rank]]
        if self.control is not None:
            self.control.close()
            self.control = None
        self.tables, self.ones = (), {}


# Live legacy workspaces of this process by the address of their own ping and pong buffers.
_BY_COMM: dict[int, LegacyWorkspace] = {}


def legacy_sizes(tp_size: int, max_token_num: int, hidden_dim: int) -> dict[str, int]:
    """Bytes of one rank's buffers: ``comm`` (each of two), ``flags`` (the legacy barrier
    size), ``flags_in`` (barrier-in, large enough for the kernels' flags) and ``lamport`` (each
    of the three buffers, one segment)."""
    r16 = fw._round16
    kernel_flags = fw._plan(
        "trtllm_create_ipc_workspace_for_all_reduce", tp_size, 1, 8, torch.bfloat16
    )["flags"]
    flags = r16((MAX_ALL_REDUCE_BLOCKS + 1) * 4 * tp_size * 2)
    lamport = r16(tp_size * LamportTokenNumThreshold * tp_size * hidden_dim * 2)
    return {
        "comm": r16(tp_size * max_token_num * hidden_dim * 4),
        "flags": flags,
        "flags_in": max(flags, r16(kernel_flags)),
        "lamport": lamport,
    }


def create_legacy_workspace(
    op: str,
    rank: int,
    tp_size: int,
    max_token_num: int,
    hidden_dim: int,
    group: Any,
    comm_backend: Any,
    timeout_s: Any,
) -> list[list[int]]:
    """Allocate, fill and register one legacy workspace (collective); returns the seven
    lists. Every check runs before anything is allocated; a failure frees what was made."""
    fw.check_group_shape(
        op, ("tp_size", "rank", "max_token_num"), tp_size, rank, max_token_num, hidden_dim
    )
    if tp_size > _MAX_WORLD:
        raise NotImplementedError(
            f"{op}: tp_size ({tp_size}) is above the {_MAX_WORLD} ranks the kernels serve "
            "within one node; use NCCL (torch.distributed.all_reduce) for larger groups"
        )
    timeout = fw._timeout_arg(op, timeout_s)
    s = legacy_sizes(tp_size, max_token_num, hidden_dim)
    segment = s["lamport"]
    if segment > MAX_COMM_SIZE:
        raise ValueError(
            f"{op}: one Lamport buffer would need {segment} bytes, above MAX_COMM_SIZE "
            f"({MAX_COMM_SIZE}); use a smaller hidden_dim or tp_size"
        )
    backend = fw._group_backend(op, comm_backend, group, rank, tp_size)
    sizes = [s["comm"], s["comm"], s["flags_in"], s["flags"], 3 * segment]
    state = LegacyWorkspace(rank, tp_size, max_token_num, hidden_dim, [], backend)

    def seven(res) -> list[list[int]]:
        ping, pong, flags_in, flags_out, lamport = res.shared
        parts = [[p + k * segment for p in lamport] for k in range(3)]
        return [list(ping), list(pong), list(flags_in), list(flags_out)] + parts

    def fill(res) -> None:
        own = [buf[rank] for buf in seven(res)]
        fw._zero(own[2], s["flags_in"])
        fw._zero(own[3], s["flags"])
        fw.trtllm_lamport_initialize_all(own[4], own[5], own[6], segment, torch.bfloat16)
        fw._synchronize()
        state.control = _fusion_launch.new_control_block(
            fw._current_device(), segment, s["comm"], timeout
        )
        res.control = state  # released with the buffers: state.close() frees the block

    def finish(res) -> None:
        state.handles = seven(res)
        device = fw._table_device()
        tables = []
        for k in (0, 1):
            ptrs = state.handles[k] + state.handles[2] + state.handles[4]
            table = torch.tensor(ptrs + [int(state.control.ptr)], dtype=torch.int64, device=device)
            state.control.attach(table)
            tables.append(table)
        state.tables = tuple(tables)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            state.ones[(dtype, hidden_dim)] = torch.ones(hidden_dim, dtype=dtype, device=device)
        for k in (0, 1):
            _BY_COMM[state.handles[k][rank]] = state
        fw._synchronize()

    res, _ = fw._create(op, backend, sizes, fill, finish)
    handles = state.handles
    fw._LIVE[id(handles)] = (handles, res)
    return handles


def _as_list(ptrs: torch.Tensor) -> list[int]:
    return [int(v) for v in ptrs.tolist()]


def find_legacy_workspace(op: str, tp_rank: int, lists: dict[str, torch.Tensor]):
    """The live workspace and the pointer table a call names (``lists``: argument name -> its
    CPU int64 tensor, the seven names of §7 with peer_comm_buffer_ptrs once). Raises
    ValueError when a list is not the workspace's."""
    comm = _as_list(lists["peer_comm_buffer_ptrs"])
    own = comm[tp_rank]
    ws = _BY_COMM.get(own)
    if ws is None:
        raise ValueError(
            f"{op}: peer_comm_buffer_ptrs[{tp_rank}] ({own:#x}) is not the comm buffer of a "
            "live workspace of this process; pass the lists that "
            "trtllm_create_ipc_workspace_for_all_reduce returned (not destroyed)"
        )
    which = 0 if comm == ws.handles[0] else 1 if comm == ws.handles[1] else -1
    if which < 0:
        raise ValueError(
            f"{op}: peer_comm_buffer_ptrs must be the workspace's list 0 or 1 (every rank's "
            "comm buffer), got another list"
        )
    for k in range(2, 7):
        name = _POINTER_LISTS[k]
        if _as_list(lists[name]) != ws.handles[k]:
            raise ValueError(
                f"{op}: {name} is not list {k} of the workspace whose comm buffer this call "
                "passes (the seven lists must come from one workspace, in order)"
            )
    return ws, ws.tables[which]


def trtllm_create_ipc_workspace_for_all_reduce(
    rank: int,
    tp_size: int,
    max_token_num: int,
    hidden_dim: int,
    group: Any = None,
    *,
    comm_backend: Any = None,
    timeout_s: float | None = None,
) -> list[list[int]]:
    """Create the legacy workspace of trtllm_custom_all_reduce (deprecated).

    Seven lists of ``tp_size`` pointers: two comm buffers of ``tp_size * max_token_num *
    hidden_dim * 4`` bytes, two barrier-flag buffers (zeroed; barrier-in large enough for the
    kernels' flags) and three Lamport buffers of ``tp_size * 16 * tp_size * hidden_dim * 2``
    bytes filled with the sentinel (consecutive segments of one allocation). ``tp_size`` <= 8.
    ``timeout_s`` bounds every wait for a peer (default FUSEDCOMM_TIMEOUT_S). Collective over
    ``comm_backend`` (or ``group``); ends with a barrier. Laid out as this module describes.
    """
    op = "trtllm_create_ipc_workspace_for_all_reduce"
    warnings.warn(
        f"{op} is deprecated; use create_allreduce_fusion_workspace",
        DeprecationWarning,
        stacklevel=2,
    )
    return create_legacy_workspace(
        op, rank, tp_size, max_token_num, hidden_dim, group, comm_backend, timeout_s
    )
