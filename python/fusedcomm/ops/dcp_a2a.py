"""Decode context-parallel (DCP) all-to-all frontends: init_workspace and alltoall.

Each rank of a CP group holds, for every entry of a batch, one partial attention output and its
softmax statistics per CP rank; the all-to-all hands rank ``r`` every rank's slice ``r``::

    out_o[..., p, :] = (rank p's partial_o)[..., r, :]      for every rank p (r included)
    out_s[..., p, :] = (rank p's softmax_stats)[..., r, :]

The workspace is ``int64 [cp_size, size / 8]`` (row ``q`` = rank ``q``'s memory, mapped here
at one stride: :func:`~fusedcomm.decode_cp_a2a_allocate_mnnvl_workspace`, or, for ranks
simulated on one GPU, a plain ``torch.zeros`` tensor). Its layout and the protocol:
``fusedcomm.runtime.dcp_a2a_workspace`` and ``include/fusedcomm/kernels/dcp_a2a.cuh``.

Every wait for a peer is bounded (``timeout_s`` of the initialisation, default
``FUSEDCOMM_TIMEOUT_S``); a rank that gives up tells its peers, and from then on the workspace
is refused on every rank with a :class:`~fusedcomm.CommFailureError` until
:func:`decode_cp_a2a_init_workspace` runs again on every rank (then a barrier). Argument
errors are :class:`~fusedcomm.runtime.dcp_a2a_workspace.DcpA2AError`: ValueErrors or
TypeErrors that are also RuntimeErrors. Calls are CUDA-graph capturable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import Any

import torch

from .. import envs
from ..runtime.dcp_a2a_workspace import (
    DCP_A2A_CHUNK_BYTES,
    DcpA2ALayout,
    DcpA2ATypeError,
    DcpA2AValueError,
    _cp_size,
    _int,
)
from ..runtime.failures import FailureState, FamilyNames
from ._register import register_op, tracing

__all__ = ["decode_cp_a2a_alltoall", "decode_cp_a2a_init_workspace"]

_O_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _module():
    from ..jit import load_module

    return load_module("dcp_a2a")


@functools.cache
def _names() -> FamilyNames:
    d = dict(_module().dcp_a2a_describe())
    return FamilyNames(op=str(d["op"]), phases=tuple(str(p) for p in d["phases"]))


@functools.cache
def _pdl_default(device: int) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _tensor(op: str, name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DcpA2ATypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


@dataclasses.dataclass(eq=False)
class _Workspace:
    """What this process knows about one initialised workspace (one rank's view)."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    rank: int
    world: int
    device: int
    failure: FailureState
    record: Any  # the ws record the entry takes (see csrc/dcp_a2a.cu)


_lock = threading.Lock()
_workspaces: dict[tuple[int, int], _Workspace] = {}


# While torch.compile traces, tensors have no addresses: the checks that read them are left to
# the run (the C++ entry checks alignment and overlap again, and the op finds the state).


def _rows(op: str, workspace: Any, cp_size: int) -> torch.Tensor:
    workspace = _tensor(op, "workspace", workspace)
    if workspace.dtype != torch.int64:
        raise DcpA2ATypeError(f"{op}: workspace.dtype ({workspace.dtype}) must be int64")
    if workspace.dim() != 2:
        raise DcpA2AValueError(
            f"{op}: workspace must be 2-D [cp_size, size / 8], got {workspace.dim()}-D"
        )
    if workspace.size(0) != cp_size:
        raise DcpA2AValueError(
            f"{op}: workspace.size(0) ({workspace.size(0)}) must equal cp_size ({cp_size})"
        )
    if workspace.size(1) > 1 and workspace.stride(1) != 1:
        raise DcpA2AValueError(f"{op}: workspace rows must be contiguous ({workspace.stride()})")
    need = DcpA2ALayout(cp_size).size_per_rank
    if workspace.size(1) * 8 < need:
        raise DcpA2AValueError(
            f"{op}: a workspace row ({workspace.size(1) * 8} bytes) must hold "
            f"decode_cp_a2a_workspace_size({cp_size}) = {need} bytes"
        )
    if not workspace.is_cuda:
        raise DcpA2AValueError(f"{op}: workspace must be CUDA memory, got {workspace.device}")
    if workspace.data_ptr() % 128 or (cp_size > 1 and workspace.stride(0) * 8 % 128):
        raise DcpA2AValueError(f"{op}: workspace rows must start at multiples of 128 bytes")
    return workspace


def decode_cp_a2a_init_workspace(
    workspace: torch.Tensor, cp_rank: int, cp_size: int, *, timeout_s: float | None = None
) -> None:
    """Prepare this rank's row of a DCP all-to-all workspace (synchronous).

    ``workspace``: ``int64 [cp_size, n]`` CUDA tensor, ``8 n`` at least
    :func:`~fusedcomm.decode_cp_a2a_workspace_size` ``(cp_size)``, row ``q`` rank ``q``'s
    memory. Zeroes row ``cp_rank`` (its flags and round numbers), starts a fresh failure state
    (a workspace refused after a failure is usable again once every rank has initialised it
    again) and synchronises the current stream. ``timeout_s`` bounds every wait for a peer in
    the all-to-alls on this row (default ``FUSEDCOMM_TIMEOUT_S``).

    Collective in effect: every rank must finish it, and the group pass a barrier, before any
    rank's first all-to-all (ranks simulated on one GPU: initialise every row, then
    ``torch.cuda.synchronize()``).
    """
    op = "decode_cp_a2a_init_workspace"
    cp_size = _cp_size(op, cp_size)
    cp_rank = _int(op, "cp_rank", cp_rank, 0, cp_size - 1)
    workspace = _rows(op, workspace, cp_size)
    timeout = envs.default_timeout_s() if timeout_s is None else timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise DcpA2ATypeError(f"{op}: timeout_s must be a number of seconds, got {timeout_s!r}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise DcpA2AValueError(f"{op}: timeout_s ({timeout_s}) must be a positive number")
    device = workspace.device.index
    _module().dcp_a2a_prepare(device)  # loaded before any rank's first launch
    with torch.cuda.device(device):
        workspace[cp_rank].zero_()
        torch.cuda.current_stream().synchronize()
        failure = FailureState(device, _names())
    row_stride = workspace.stride(0) * 8 if cp_size > 1 else workspace.size(1) * 8
    record = [
        device,
        workspace.data_ptr(),
        row_stride,
        workspace.size(1) * 8,
        cp_size,
        cp_rank,
        failure.claim_ptr,
        failure.record_device_ptr,
        int(timeout * 1e9),
    ]
    import tvm_ffi

    state = _Workspace(
        shape=tuple(workspace.shape),
        strides=tuple(workspace.stride()),
        rank=cp_rank,
        world=cp_size,
        device=device,
        failure=failure,
        record=tvm_ffi.convert(record),
    )
    key = (workspace.data_ptr(), cp_rank)
    with _lock:
        old = _workspaces.pop(key, None)
        _workspaces[key] = state
    if old is not None:
        old.failure.close()


def _state(op: str, workspace: Any, cp_rank: Any, cp_size: int) -> _Workspace:
    workspace = _tensor(op, "workspace", workspace)
    try:
        st = _workspaces[(workspace.data_ptr(), cp_rank)]
    except (KeyError, TypeError):
        raise DcpA2AValueError(
            f"{op}: this workspace was not initialised for cp_rank {cp_rank!r} in this process; "
            "call decode_cp_a2a_init_workspace(workspace, cp_rank, cp_size) first"
        ) from None
    if tuple(workspace.shape) != st.shape or tuple(workspace.stride()) != st.strides:
        raise DcpA2AValueError(
            f"{op}: workspace ({tuple(workspace.shape)}) is not the tensor that was initialised "
            f"({st.shape})"
        )
    if cp_size != st.world:
        raise DcpA2AValueError(
            f"{op}: cp_size ({cp_size}) differs from the initialisation's ({st.world})"
        )
    st.failure.check(op)
    return st


def _check_inputs(
    op: str, partial_o: Any, softmax_stats: Any, cp_size: int, addresses: bool = True
) -> int:
    """Validate the inputs; return N, the product of the leading sizes."""
    o = _tensor(op, "partial_o", partial_o)
    s = _tensor(op, "softmax_stats", softmax_stats)
    if o.dtype not in _O_DTYPES:
        raise DcpA2ATypeError(f"{op}: partial_o must be float16 or bfloat16, got {o.dtype}")
    if s.dtype != torch.float32:
        raise DcpA2ATypeError(f"{op}: softmax_stats must be float32, got {s.dtype}")
    if o.dim() < 2 or s.dim() != o.dim():
        raise DcpA2AValueError(
            f"{op}: partial_o ({tuple(o.shape)}) and softmax_stats ({tuple(s.shape)}) must be "
            "[..., cp_size, Dv] and [..., cp_size, S] with the same number of dimensions"
        )
    if o.shape[:-1] != s.shape[:-1]:
        raise DcpA2AValueError(
            f"{op}: partial_o ({tuple(o.shape)}) and softmax_stats ({tuple(s.shape)}) must have "
            "the same leading sizes"
        )
    if o.size(-2) != cp_size:
        raise DcpA2AValueError(
            f"{op}: the second-to-last size ({o.size(-2)}) must equal cp_size ({cp_size})"
        )
    dv, stats = o.size(-1), s.size(-1)
    if dv < 1 or dv * o.element_size() % 16:
        raise DcpA2AValueError(
            f"{op}: Dv * element size ({dv} * {o.element_size()}) must be a positive multiple "
            "of 16 bytes"
        )
    if stats < 2 or stats % 2:
        raise DcpA2AValueError(f"{op}: the stats size S ({stats}) must be even and >= 2")
    entry = dv * o.element_size() + 4 * stats
    if entry > DCP_A2A_CHUNK_BYTES:
        raise DcpA2AValueError(
            f"{op}: one entry (Dv * {o.element_size()} + 4 S = {entry} bytes) must fit a chunk "
            f"({DCP_A2A_CHUNK_BYTES} bytes)"
        )
    if not (o.is_contiguous() and s.is_contiguous()):
        raise DcpA2AValueError(f"{op}: partial_o and softmax_stats must be contiguous")
    if addresses and (o.data_ptr() % 16 or s.data_ptr() % 16):
        raise DcpA2AValueError(f"{op}: partial_o and softmax_stats must be 16-byte aligned")
    return math.prod(o.shape[:-2])


def _outputs(op: str, out: Any, o: torch.Tensor, s: torch.Tensor, addresses: bool = True):
    if out is None:
        return torch.empty_like(o), torch.empty_like(s)
    if isinstance(out, torch.Tensor) or not isinstance(out, (tuple, list)) or len(out) != 2:
        raise DcpA2ATypeError(f"{op}: out must be a pair (partial_o_out, softmax_stats_out)")
    po = _tensor(op, "out[0]", out[0])
    so = _tensor(op, "out[1]", out[1])
    for name, t, like in (("out[0]", po, o), ("out[1]", so, s)):
        if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
            raise DcpA2AValueError(
                f"{op}: {name} ({tuple(t.shape)}, {t.dtype}, {t.device}) must match its input "
                f"({tuple(like.shape)}, {like.dtype}, {like.device})"
            )
        if not t.is_contiguous() or addresses and t.data_ptr() % 16:
            raise DcpA2AValueError(f"{op}: {name} must be contiguous and 16-byte aligned")
    if not addresses:
        return po, so
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (o, s, po, so)]
    if o.numel():
        for a0, a1 in spans[:2]:
            for b0, b1 in spans[2:]:
                if a0 < b1 and b0 < a1:
                    raise DcpA2AValueError(f"{op}: the outputs must not overlap the inputs")
        if spans[2][0] < spans[3][1] and spans[3][0] < spans[2][1]:
            raise DcpA2AValueError(f"{op}: the two outputs must not overlap")
    return po, so


def _alltoall_impl(
    partial_o: torch.Tensor,
    softmax_stats: torch.Tensor,
    workspace: torch.Tensor,
    cp_rank: int,
    cp_size: int,
    enable_pdl: bool,
    partial_o_out: torch.Tensor,
    softmax_stats_out: torch.Tensor,
) -> None:
    st = _state("decode_cp_a2a_alltoall", workspace, cp_rank, cp_size)
    _module().dcp_a2a_alltoall_launch(
        partial_o, softmax_stats, partial_o_out, softmax_stats_out, st.record, enable_pdl
    )


_alltoall_op = register_op(
    "decode_cp_a2a_alltoall(Tensor partial_o, Tensor softmax_stats, Tensor(a!) workspace, "
    "int cp_rank, int cp_size, bool enable_pdl, Tensor(b!) partial_o_out, "
    "Tensor(c!) softmax_stats_out) -> ()",
    _alltoall_impl,
    lambda *args: None,
)


def decode_cp_a2a_alltoall(
    partial_o: torch.Tensor,
    softmax_stats: torch.Tensor,
    workspace: torch.Tensor,
    cp_rank: int,
    cp_size: int,
    enable_pdl: bool | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchange the partial attention outputs of a CP group (a transpose across ranks).

    Unfused reference (``fusedcomm.reference.dcp_alltoall_reference``), on rank ``r``::

        for p in range(cp_size):
            partial_o_out[..., p, :] = partial_o_of_rank_p[..., r, :]
            softmax_stats_out[..., p, :] = softmax_stats_of_rank_p[..., r, :]

    Exact bytes, no arithmetic. ``partial_o``: float16 or bfloat16 ``[..., cp_size, Dv]``
    with ``Dv * element size`` a multiple of 16; ``softmax_stats``: float32 ``[..., cp_size,
    S]``, ``S`` even and >= 2, the same leading sizes; both contiguous, on the workspace's GPU.
    Every rank of the group calls it with the same shapes and dtypes, in the same order. A
    leading size of 0 returns empty outputs at once (no communication); ``cp_size`` 1 copies.
    ``out``: an optional ``(partial_o_out, softmax_stats_out)`` pair of contiguous tensors
    shaped like the inputs (not overlapping them), written and returned; by default new
    tensors. ``enable_pdl``: programmatic dependent launch (default: on SM90 and newer).
    Returns ``(partial_o_out, softmax_stats_out)``.
    """
    op = "decode_cp_a2a_alltoall"
    cp_size = _cp_size(op, cp_size)
    cp_rank = _int(op, "cp_rank", cp_rank, 0, cp_size - 1)
    live = not tracing()
    n = _check_inputs(op, partial_o, softmax_stats, cp_size, live)
    po, so = _outputs(op, out, partial_o, softmax_stats, live)
    if not (partial_o.is_cuda and softmax_stats.device == partial_o.device):
        raise DcpA2AValueError(
            f"{op}: partial_o ({partial_o.device}) and softmax_stats ({softmax_stats.device}) "
            "must be on one GPU"
        )
    if live:  # (while tracing, the C++ entry checks the rows at the run)
        _rows(op, workspace, cp_size)
    if workspace.device != partial_o.device:
        raise DcpA2AValueError(
            f"{op}: the workspace ({workspace.device}) and partial_o ({partial_o.device}) must "
            "be on one GPU"
        )
    if n == 0:
        if live:
            _state(op, workspace, cp_rank, cp_size)
        return po, so
    pdl = _pdl_default(partial_o.device.index) if enable_pdl is None else bool(enable_pdl)
    args = (partial_o, softmax_stats, workspace, cp_rank, cp_size, pdl, po, so)
    if live:
        _alltoall_impl(*args)
    else:
        _alltoall_op(*args)
    return po, so
