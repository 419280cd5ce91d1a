"""The MoE all-to-all workspaces this process has initialised, and moe_a2a_initialize.

Each initialised workspace (one rank's view of it) has a :class:`_Workspace`: its layout, its
failure state (docs/failure-protocol.md), its dropped-id counter, the record the launch entries
take, the checked plans of the calls seen so far and the round in progress (the last dispatch,
which the next combine must match). The frontends (ops/moe_a2a.py) find it by the workspace's
address and this rank.

The failure state and the dropped-id counter live as long as the process knows the workspace:
initialising it again resets them in place, so CUDA graphs captured before (their kernels hold
those addresses) keep working after a recovery.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import Any

import torch

from .. import envs
from ..runtime.failures import FailureState, FamilyNames
from ..runtime.moe_a2a_workspace import MoeA2ALayout, moe_a2a_metainfo
from ..runtime.moe_a2a_workspace import _int as _int

__all__ = ["MoeA2ACheckError", "moe_a2a_initialize"]


class MoeA2ACheckError(ValueError, RuntimeError):
    """A MoE all-to-all call whose arguments the workspace cannot serve (a combine that does not
    repeat its dispatch, a payload in the wrong place). A ValueError, and also a RuntimeError:
    other implementations of this API raise these from their C++ checks as RuntimeError."""


@functools.cache
def _module():
    from ..jit import load_module

    return load_module("moe_a2a")


@functools.cache
def _describe() -> dict:
    return dict(_module().moe_a2a_describe())


@functools.cache
def _pdl_default(device: int) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _tensor(op: str, name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


@dataclasses.dataclass(frozen=True)
class _Round:
    """A dispatch that has not been combined yet: what its combine must repeat."""

    local_tokens: int
    top_k: int
    max_tokens: int  # runtime_max_tokens_per_rank
    combine_offset: int
    owner: Any = None  # the MoeAlltoAll that dispatched (None: the free function)
    mask: int | None = None  # the round's active_rank_mask (None: every rank)


@dataclasses.dataclass(eq=False)
class _Workspace:
    """What this process knows about one initialised workspace (one rank's view)."""

    workspace: torch.Tensor
    rank: int
    world: int
    layout: MoeA2ALayout
    row_bytes: int
    row_stride: int
    device: int
    metainfo: torch.Tensor
    failure: FailureState
    dropped: torch.Tensor  # int64 [1] on the device: ids outside [0, E) since initialisation
    record: Any  # the ws record the entries take (see csrc/moe_a2a.cu)
    plans: dict = dataclasses.field(default_factory=dict)
    round: _Round | None = None  # the dispatch the next combine belongs to

    @property
    def own_row(self) -> int:
        return self.workspace.data_ptr() + self.rank * self.row_stride

    def close(self) -> None:
        self.failure.close()


_lock = threading.Lock()
_workspaces: dict[tuple[int, int], _Workspace] = {}


def _rows(op: str, workspace: Any, ep_size: int) -> torch.Tensor:
    workspace = _tensor(op, "workspace", workspace)
    if workspace.dtype != torch.uint8:
        raise TypeError(f"{op}: workspace.dtype ({workspace.dtype}) must be uint8")
    if workspace.dim() != 2:
        raise ValueError(f"{op}: workspace must be 2-D [ep_size, size], got {workspace.dim()}-D")
    if workspace.size(0) != ep_size:
        raise ValueError(
            f"{op}: workspace.size(0) ({workspace.size(0)}) must equal ep_size ({ep_size})"
        )
    if not workspace.is_cuda:
        raise ValueError(f"{op}: workspace must be CUDA memory, got {workspace.device}")
    if workspace.size(1) > 1 and workspace.stride(1) != 1:
        raise ValueError(f"{op}: workspace rows must be contiguous (strides {workspace.stride()})")
    return workspace


def moe_a2a_initialize(
    workspace: torch.Tensor,
    ep_rank: int,
    ep_size: int,
    max_num_tokens: int,
    eplb_stats_num_experts: int = 0,
    *,
    timeout_s: float | None = None,
) -> torch.Tensor:
    """Prepare this rank's row of a MoE all-to-all workspace; return the metainfo tensor.

    ``workspace``: ``uint8 [ep_size, size_per_rank]`` CUDA tensor whose row ``q`` is rank
    ``q``'s memory (rows at one stride, as :class:`~fusedcomm.MoeAlltoAll` allocates them).
    Zeroes the own row, clears the workspace's failure state and dropped-id counter (a
    workspace refused after a failure is usable again once every rank has initialised it
    again; both keep their device addresses, so CUDA graphs captured before stay valid) and
    synchronises the device. ``max_num_tokens``: the most tokens any rank dispatches in one round.
    ``timeout_s``: bound on every wait for a peer (default ``FUSEDCOMM_TIMEOUT_S``).

    Collective in effect: every rank must finish it before any rank dispatches, so put a
    barrier of the group after it (``MoeAlltoAll`` does). Initialising again after a failure
    needs the group quiet first: synchronise the device on every rank, then a barrier, then
    initialise (a peer's kernel of the failed round may still write abort marks into this row
    until its own timeout; ``MoeAlltoAll.reset`` does all of this). Returns the CPU int64 metainfo of
    the row layout (equal on every rank; treat it as opaque).
    """
    op = "moe_a2a_initialize"
    ep_size = _int(op, "ep_size", ep_size, 1)
    ep_rank = _int(op, "ep_rank", ep_rank, 0, ep_size - 1)
    max_num_tokens = _int(op, "max_num_tokens", max_num_tokens, 1)
    eplb = _int(op, "eplb_stats_num_experts", eplb_stats_num_experts, 0)
    workspace = _rows(op, workspace, ep_size)
    timeout = envs.default_timeout_s() if timeout_s is None else float(timeout_s)
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"{op}: timeout_s ({timeout_s}) must be a positive number of seconds")
    max_ranks = int(_describe()["max_ranks"])
    if ep_size > max_ranks:
        raise ValueError(
            f"{op}: ep_size ({ep_size}) must be <= {max_ranks}: the kernels serve the GPUs of one "
            "node"
        )
    layout = MoeA2ALayout(ep_size, max_num_tokens, eplb)
    row_bytes = workspace.size(1)
    if row_bytes < layout.payload_data:
        raise ValueError(
            f"{op}: a workspace row ({row_bytes} bytes) must hold at least the auxiliary fields "
            f"({layout.payload_data} bytes for ep_size {ep_size}, max_num_tokens "
            f"{max_num_tokens}); size it with moe_a2a_get_workspace_size_per_rank"
        )
    row_stride = workspace.stride(0) if ep_size > 1 else row_bytes
    if workspace.data_ptr() % 128 or row_stride % 128:
        raise ValueError(f"{op}: workspace rows must start at multiples of 128 bytes")
    device = workspace.device.index
    d = _describe()
    names = FamilyNames(op=str(d["op"]), phases=tuple(str(p) for p in d["phases"]))

    key = (workspace.data_ptr(), ep_rank)
    with _lock:
        old = _workspaces.pop(key, None)
    with torch.cuda.device(device):
        torch.cuda.synchronize(device)  # none of this rank's kernels still reads the row
        if old is not None and old.device == device:
            failure, dropped = old.failure, old.dropped
            _module().moe_a2a_clear_claim(device, failure.claim_ptr)
            failure.clear()
            dropped.zero_()
        else:
            if old is not None:
                old.close()
            failure = FailureState(device, names)
            dropped = torch.zeros(1, dtype=torch.int64, device=workspace.device)
        workspace[ep_rank].zero_()
        torch.cuda.synchronize(device)
    record = [
        device,
        workspace.data_ptr(),
        row_stride,
        row_bytes,
        ep_size,
        ep_rank,
        max_num_tokens,
        eplb,
        failure.claim_ptr,
        failure.record_device_ptr,
        int(timeout * 1e9),
    ]
    metainfo = moe_a2a_metainfo(ep_size, max_num_tokens, eplb)
    state = _Workspace(
        workspace=workspace,
        rank=ep_rank,
        world=ep_size,
        layout=layout,
        row_bytes=row_bytes,
        row_stride=row_stride,
        device=device,
        metainfo=metainfo,
        failure=failure,
        dropped=dropped,
        record=_ffi_array(record),
    )
    with _lock:
        _workspaces[key] = state
    return metainfo


def _ffi_array(values: list[int]):
    import tvm_ffi

    return tvm_ffi.convert(values)


def _state(op: str, workspace: Any, ep_rank: Any, metainfo: Any = None) -> _Workspace:
    workspace = _tensor(op, "workspace", workspace)
    try:
        st = _workspaces[(workspace.data_ptr(), ep_rank)]
    except (KeyError, TypeError):
        raise ValueError(
            f"{op}: this workspace was not initialised for ep_rank {ep_rank!r} in this process; "
            "call moe_a2a_initialize(workspace, ep_rank, ep_size, max_num_tokens) first"
        ) from None
    if workspace.shape != st.workspace.shape or workspace.stride() != st.workspace.stride():
        raise ValueError(
            f"{op}: workspace ({tuple(workspace.shape)}, strides {workspace.stride()}) is not "
            f"the tensor that was initialised ({tuple(st.workspace.shape)})"
        )
    if metainfo is not None and metainfo is not st.metainfo:
        metainfo = _tensor(op, "metainfo", metainfo)
        if metainfo.shape != st.metainfo.shape or not torch.equal(metainfo.cpu(), st.metainfo):
            raise ValueError(f"{op}: metainfo does not belong to this workspace")
    st.failure.check(op)
    return st


def _max_tokens(op: str, st: _Workspace, value: Any) -> int:
    """runtime_max_tokens_per_rank, checked against the workspace's max_num_tokens."""
    bound = st.layout.max_num_tokens
    return _int(
        op, "runtime_max_tokens_per_rank (<= the max_num_tokens of initialisation)", value, 1, bound
    )


def _pdl(enable_pdl: Any, device: int) -> bool:
    return _pdl_default(device) if enable_pdl is None else bool(enable_pdl)
