"""Workspaces of the fused all-reduce family: peer-shared buffers plus a rank-local control block.

A fusion workspace holds, on every rank of a group, three buffers that every other rank maps
through CUDA IPC (two-shot comm buffer, barrier flags, Lamport region of three segments) and
one rank-local control block (protocol state and failure record). The kernels find them
through the pointer table ``workspace_tensor``, an int64 CUDA tensor of ``3 * W + 1`` entries::

    [comm_0 .. comm_{W-1}, flags_0 .. flags_{W-1}, lamport_0 .. lamport_{W-1}, control]

The three buffer sizes come from the kernels' own layout (``fusion_control.workspace_bytes``);
the arithmetic here only rounds them up to 16 bytes and estimates what one call or one full
segment would need (to warn, and to answer ``is_buffer_size_sufficient``). The one exception is
the deprecated ``trtllm_create_ipc_workspace_for_all_reduce``, whose seven buffers keep the
sizes that API has always given them. Creation and destruction are collective over the group;
creation ends with a barrier, and a failed creation frees what it allocated before raising.

Typical use (every rank of a tensor-parallel group)::

    ws = create_allreduce_fusion_workspace("auto", world_size=W, rank=r, max_token_num=M,
                                           hidden_dim=D, dtype=torch.bfloat16,
                                           comm_backend=TorchDistBackend(group=tp_group))
    out = allreduce_fusion(x, ws, AllReduceFusionPattern.kAllReduce)
    ...
    ws.destroy()
"""

from __future__ import annotations

import abc
import logging
import socket
import sys
import warnings
from typing import Any

import torch

from .._checks import ELEMENT_SIZE, element_size, int_arg
from . import fusion_control
from .comm_backend import local_step, resolve_backend
from .cuda_ipc import CudaRTLibrary, create_shared_buffer, free_shared_buffer
from .lamport import (  # the legacy workspace fills through this module's names
    trtllm_lamport_initialize,
    trtllm_lamport_initialize_all,  # noqa: F401
)

__all__ = [
    "AllReduceFusionWorkspace",
    "TRTLLMAllReduceFusionWorkspace",
    "create_allreduce_fusion_workspace",
    "fusion_workspace_bytes",
    "trtllm_create_ipc_workspace_for_all_reduce_fusion",
    "trtllm_destroy_ipc_workspace_for_all_reduce",
    "trtllm_destroy_ipc_workspace_for_all_reduce_fusion",
]

_log = logging.getLogger("fusedcomm")
_PLAN_KEYS = ("comm", "flags", "lamport", "segment")


# ------------------------------------------------------------------------------------------
# Argument checks (all run before anything is allocated)


def check_group_shape(
    op: str, names: tuple[str, str, str], size, rank, rows, hidden_dim, min_rows=1
) -> None:
    """The group (``size`` >= 1, 0 <= ``rank`` < ``size``) and the shape (``rows`` >=
    ``min_rows``, ``hidden_dim`` >= 1) of a call or a workspace. ``names``: how the caller
    spells size, rank and rows."""
    size_name, rank_name, rows_name = names
    int_arg(op, size_name, size, 1)
    int_arg(op, rank_name, rank, 0)
    if rank >= size:
        raise ValueError(f"{op}: {rank_name} ({rank}) must be < {size_name} ({size})")
    int_arg(op, rows_name, rows, min_rows)
    int_arg(op, "hidden_dim", hidden_dim, 1)


def _dtype_arg(op: str, dtype: Any) -> torch.dtype:
    element_size(op, dtype)
    return dtype


def _timeout_arg(op: str, timeout_s: Any) -> float | None:
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise TypeError(
            f"{op}: timeout_s must be a number of seconds or None, got {type(timeout_s).__name__}"
        )
    if not timeout_s > 0:
        raise ValueError(f"{op}: timeout_s ({timeout_s}) must be > 0")
    return float(timeout_s)


def _group_backend(op: str, comm_backend: Any, group: Any, rank: int, size: int):
    """The communicator, checked against the rank and size the caller claims."""
    backend = resolve_backend(comm_backend, group)
    actual_rank, actual_size = backend.Get_rank(), backend.Get_size()
    if actual_size != size or actual_rank != rank:
        raise ValueError(
            f"{op}: the communicator has rank {actual_rank} of {actual_size}, but the call "
            f"says rank {rank} of {size}; pass the rank and size inside the group"
        )
    return backend


def _plan(
    op: str, world_size: int, max_token_num: int, hidden_dim: int, dtype: torch.dtype
) -> dict[str, int]:
    plan = fusion_control.workspace_bytes(world_size, max_token_num, hidden_dim, dtype)
    missing = [k for k in _PLAN_KEYS if k not in plan]
    if missing:
        raise RuntimeError(f"{op}: the kernel layout gave no size for {missing} (got {plan})")
    return {k: int(plan[k]) for k in _PLAN_KEYS}


def fusion_workspace_bytes(
    world_size: int, max_token_num: int, hidden_dim: int, dtype: torch.dtype
) -> int:
    """Device bytes that one rank's fusion workspace allocates, before allocating anything.

    The sum of the three peer-shared buffers (two-shot comm buffer, barrier flags, Lamport
    region of three segments) for a workspace created with the same arguments; the
    rank-local control block (a few bytes) is not counted. Every rank allocates this much;
    the peers' buffers are only mapped, not allocated again. Pure: no device work.
    """
    op = "fusion_workspace_bytes"
    int_arg(op, "world_size", world_size, 1)
    int_arg(op, "max_token_num", max_token_num, 1)
    int_arg(op, "hidden_dim", hidden_dim, 1)
    _dtype_arg(op, dtype)
    plan = _plan(op, world_size, max_token_num, hidden_dim, dtype)
    return plan["comm"] + plan["flags"] + plan["lamport"]


# ------------------------------------------------------------------------------------------
# Collective creation with cleanup on every path


def _current_device() -> int:
    return torch.cuda.current_device()


def _table_device() -> torch.device:
    return torch.device("cuda", _current_device())


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Resources:
    """What one creation has allocated so far; ``release()`` frees it in reverse order."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.shared: list[list[int]] = []
        self.control = None

    def release(self) -> list[str]:
        problems: list[str] = []
        if torch.cuda.is_available():
            try:
                _synchronize()
            except Exception as exc:  # noqa: BLE001 - report, keep releasing
                problems.append(f"device synchronise: {exc}")
        if self.control is not None:
            try:
                self.control.close()
            except Exception as exc:  # noqa: BLE001
                problems.append(f"control block: {exc}")
            self.control = None
        while self.shared:
            ptrs = self.shared.pop()
            try:
                free_shared_buffer(ptrs, comm_backend=self.backend)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"shared buffer: {exc}")
        return problems


def _create(op: str, backend, sizes: list[int], fill, finish):
    """Allocate ``sizes`` as shared buffers, run ``fill(res)`` and ``finish(res)`` locally
    with agreement, end with a barrier; on any failure release everything and raise."""
    res = _Resources(backend)
    try:

        def enough_memory() -> None:
            if torch.cuda.is_available():
                free, _ = torch.cuda.mem_get_info()
                if free < sum(sizes):
                    raise RuntimeError(
                        f"{sum(sizes)} bytes needed, {free} free on cuda:{_current_device()}"
                    )

        local_step(backend, op, "the device memory check", enough_memory)
        for i, size in enumerate(sizes):
            try:
                res.shared.append(create_shared_buffer(size, comm_backend=backend))
            except Exception as exc:
                raise RuntimeError(
                    f"{op}: allocating shared buffer {i} ({size} bytes) failed: {exc}"
                ) from exc
        local_step(backend, op, "initialising the buffers", lambda: fill(res))
        result = local_step(backend, op, "building the pointer table", lambda: finish(res))
        backend.barrier()
        return res, result
    except BaseException as exc:
        problems = res.release()
        if problems and isinstance(exc, Exception):
            exc.add_note(f"{op}: releasing after the failure also failed: " + "; ".join(problems))
        raise


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def _zero(ptr: int, num_bytes: int) -> None:
    lib = CudaRTLibrary()
    lib.cudaMemset(ptr, 0, num_bytes)
    lib.cudaDeviceSynchronize()


# Live workspaces made by the functions below, keyed by id() of the ipc_handles list.
_LIVE: dict[int, tuple[list, _Resources]] = {}


def _create_fusion(
    op: str,
    tp_rank: int,
    tp_size: int,
    max_token_num: int,
    hidden_dim: int,
    use_fp32_lamport: bool,
    group: Any,
    create_metadata: bool,
    comm_backend: Any,
    use_symm_dev_mem: bool,
    timeout_s: Any,
):
    check_group_shape(
        op, ("tp_size", "tp_rank", "max_token_num"), tp_size, tp_rank, max_token_num, hidden_dim
    )
    for name, flag in (
        ("use_fp32_lamport", use_fp32_lamport),
        ("create_metadata", create_metadata),
        ("use_symm_dev_mem", use_symm_dev_mem),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(flag).__name__}")
    if use_symm_dev_mem and not create_metadata:
        raise ValueError(f"{op}: use_symm_dev_mem=True needs create_metadata=True")
    timeout = _timeout_arg(op, timeout_s)
    dtype = torch.float32 if use_fp32_lamport else torch.bfloat16
    plan = _plan(op, tp_size, max_token_num, hidden_dim, dtype)
    full = tp_size * max_token_num * hidden_dim * ELEMENT_SIZE[dtype]
    if plan["segment"] < full:
        warnings.warn(
            f"{op}: one Lamport segment is capped at {plan['segment']} bytes "
            f"({full} would hold max_token_num tokens); larger calls run two-shot",
            stacklevel=3,
        )
    backend = _group_backend(op, comm_backend, group, tp_rank, tp_size)
    sizes = [_round16(plan["comm"]), _round16(plan["flags"]), _round16(plan["lamport"])]

    def fill(res: _Resources) -> None:
        flags, lamport = res.shared[1][tp_rank], res.shared[2][tp_rank]
        _zero(flags, sizes[1])
        # fp32 sentinel words whatever the dtype: every reader (16- or 32-bit) takes them for
        # empty, so a call of another dtype can never mistake the fill for data
        trtllm_lamport_initialize(lamport, sizes[2] // 4, torch.float32)
        _synchronize()
        res.control = fusion_control.new_control_block(
            _current_device(), plan["segment"], sizes[0], timeout
        )

    def finish(res: _Resources) -> torch.Tensor:
        ptrs = [p for buf in res.shared for p in buf] + [int(res.control.ptr)]
        table = torch.tensor(ptrs, dtype=torch.int64, device=_table_device())
        res.control.attach(table)  # calls find the control block without reading the table
        _synchronize()
        return table

    res, table = _create(op, backend, sizes, fill, finish)
    ipc_handles = [list(buf) for buf in res.shared]
    _LIVE[id(ipc_handles)] = (ipc_handles, res)
    if not create_metadata:
        return ipc_handles, table
    metadata = {
        "tp_rank": tp_rank,
        "tp_size": tp_size,
        "max_token_num": max_token_num,
        "hidden_dim": hidden_dim,
        "use_fp32_lamport": use_fp32_lamport,
        "buffer_size": sizes[0],
        "flag_size": sizes[1],
        "lamport_comm_size": plan["segment"],
        "lamport_buffer_size": sizes[2],
    }
    if not use_symm_dev_mem:
        return ipc_handles, table, metadata
    metadata["control_flag_ptr"] = int(res.control.ptr)
    return ipc_handles, table, [], metadata


def trtllm_create_ipc_workspace_for_all_reduce_fusion(
    tp_rank: int,
    tp_size: int,
    max_token_num: int,
    hidden_dim: int,
    use_fp32_lamport: bool = False,
    group: Any = None,
    create_metadata: bool = False,
    comm_backend: Any = None,
    use_symm_dev_mem: bool = False,
    *,
    timeout_s: float | None = None,
):
    """Create the fusion workspace (deprecated: use create_allreduce_fusion_workspace).

    Collective over ``comm_backend`` (or the ``torch.distributed`` ``group``, default WORLD);
    ``tp_rank``/``tp_size`` are this rank and the size of that group. Sized for
    ``max_token_num * hidden_dim`` elements per call (any shape with at most that many
    elements fits), fp32 when ``use_fp32_lamport`` else 16-bit. ``timeout_s`` bounds every
    wait for a peer (default FUSEDCOMM_TIMEOUT_S).

    Returns ``(ipc_handles, workspace_tensor)``; with ``create_metadata`` also ``metadata``
    (``(ipc_handles, workspace_tensor, metadata)``); with ``use_symm_dev_mem`` as well,
    ``(ipc_handles, workspace_tensor, mem_handles, metadata)`` where ``mem_handles`` is an
    empty list (the buffers are plain CUDA IPC memory). ``ipc_handles`` is three lists of
    ``tp_size`` pointers (comm, flags, Lamport); pass that same list object to
    trtllm_destroy_ipc_workspace_for_all_reduce_fusion.
    """
    warnings.warn(
        "trtllm_create_ipc_workspace_for_all_reduce_fusion is deprecated; use "
        "create_allreduce_fusion_workspace",
        DeprecationWarning,
        stacklevel=2,
    )
    return _create_fusion(
        "trtllm_create_ipc_workspace_for_all_reduce_fusion",
        tp_rank,
        tp_size,
        max_token_num,
        hidden_dim,
        use_fp32_lamport,
        group,
        create_metadata,
        comm_backend,
        use_symm_dev_mem,
        timeout_s,
    )


# Workspace factories of the other backends, by name; each backend's module registers its own
# (runtime/mnnvl_workspace.py registers "mnnvl"), so this module imports none of them.
_BACKENDS: dict[str, Any] = {}


def register_backend(name: str, factory: Any) -> None:
    """Make ``create_allreduce_fusion_workspace(backend=name)`` call ``factory``."""
    _BACKENDS[name] = factory


def _destroy(op: str, workspace: Any) -> None:
    entry = _LIVE.get(id(workspace))
    if entry is None or entry[0] is not workspace:
        raise ValueError(
            f"{op}: workspace is not the ipc_handles list of a live workspace "
            "(already destroyed, or a copy of the list)"
        )
    del _LIVE[id(workspace)]
    problems = entry[1].release()
    if problems:
        raise RuntimeError(f"{op}: releasing the workspace failed: " + "; ".join(problems))


def trtllm_destroy_ipc_workspace_for_all_reduce_fusion(workspace: list, group: Any = None) -> None:
    """Free a workspace: pass the ``ipc_handles`` list its creator returned. Collective over
    the creation's communicator (``group`` is accepted and unused)."""
    _destroy("trtllm_destroy_ipc_workspace_for_all_reduce_fusion", workspace)


def trtllm_destroy_ipc_workspace_for_all_reduce(workspace: list, group: Any = None) -> None:
    """Free a legacy workspace (fusion workspaces are accepted too). Collective."""
    _destroy("trtllm_destroy_ipc_workspace_for_all_reduce", workspace)


# ------------------------------------------------------------------------------------------
# Unified API


class AllReduceFusionWorkspace(abc.ABC):
    """A workspace of one backend of allreduce_fusion; its type selects the kernels.

    ``world_size`` and ``rank`` are the group's. ``destroy()`` is collective and idempotent;
    a workspace dropped without it warns with ``ResourceWarning`` and releases itself. A
    backend implements ``backend``, ``is_buffer_size_sufficient`` and ``_release``.
    """

    def __init__(self, world_size: int, rank: int):
        self.world_size = world_size
        self.rank = rank
        self._destroyed = False

    @property
    @abc.abstractmethod
    def backend(self) -> str:
        """The backend's name, e.g. ``"trtllm"``."""

    @abc.abstractmethod
    def is_buffer_size_sufficient(
        self,
        tp_size: int,
        num_tokens: int,
        hidden_dim: int,
        dtype: torch.dtype,
        use_oneshot: bool | None = None,
    ) -> bool:
        """Whether a call of this shape fits (False, with a log line, when it does not)."""

    @staticmethod
    def _fits(problems: list[str]) -> bool:
        """is_buffer_size_sufficient's answer for the problems a backend found."""
        if problems:
            _log.warning("fusion workspace too small or mismatched: %s", "; ".join(problems))
        return not problems

    @abc.abstractmethod
    def _release(self) -> None:
        """Free the backend's resources (collective)."""

    def checkpoint_prepare(self) -> None:
        """Engines call this before suspending the process; saving a fusion workspace is not
        implemented (engines skip checkpointing on NotImplementedError)."""
        raise NotImplementedError(
            f"{type(self).__name__}.checkpoint_prepare: checkpointing an all-reduce fusion "
            "workspace is not implemented"
        )

    def checkpoint_restore(self, comm_backend: Any) -> None:
        """Engines call this after resuming the process; restoring a fusion workspace is not
        implemented."""
        raise NotImplementedError(
            f"{type(self).__name__}.checkpoint_restore: checkpointing an all-reduce fusion "
            "workspace is not implemented"
        )

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    def destroy(self) -> None:
        """Free the workspace on every rank (collective). Later calls do nothing."""
        if self._destroyed:
            return
        self._destroyed = True
        self._release()

    def __del__(self) -> None:
        if getattr(self, "_destroyed", True):
            return
        warnings.warn(
            f"{type(self).__name__} (rank {self.rank} of {self.world_size}) was not "
            "destroyed; call destroy() on every rank",
            ResourceWarning,
            stacklevel=2,
        )
        if sys.is_finalizing():
            self._destroyed = True  # the process is exiting: the driver releases everything
            return
        try:
            self.destroy()
        except Exception:  # noqa: BLE001 - nothing may propagate out of __del__
            pass


class TRTLLMAllReduceFusionWorkspace(AllReduceFusionWorkspace):
    """The Lamport (TRT-LLM style) workspace for one node: CUDA IPC buffers, no multicast.

    Collective over ``comm_backend`` (or ``group``); ``tp_size``/``tp_rank`` are that
    group's size and this rank in it. Holds ``ipc_handles``, ``workspace_tensor`` (the
    pointer table), ``mem_handles`` (empty), ``metadata`` (sizes and shape, under the
    reference API's keys) and ``workspace_bytes`` (device bytes this rank allocated for shared
    buffers).
    """

    def __init__(
        self,
        tp_size: int,
        tp_rank: int,
        max_token_num: int,
        hidden_dim: int,
        dtype: torch.dtype = torch.float16,
        comm_backend: Any = None,
        group: Any = None,
        *,
        timeout_s: float | None = None,
    ):
        op = "TRTLLMAllReduceFusionWorkspace"
        self._destroyed = True  # until created: a failed __init__ leaves nothing to free
        _dtype_arg(op, dtype)
        self.ipc_handles, self.workspace_tensor, self.mem_handles, self.metadata = _create_fusion(
            op,
            tp_rank,
            tp_size,
            max_token_num,
            hidden_dim,
            dtype == torch.float32,
            group,
            True,
            comm_backend,
            True,
            timeout_s,
        )
        super().__init__(tp_size, tp_rank)
        self.dtype = dtype
        self.max_token_num = max_token_num
        self.hidden_dim = hidden_dim
        m = self.metadata
        self.workspace_bytes = m["buffer_size"] + m["flag_size"] + m["lamport_buffer_size"]

    @property
    def backend(self) -> str:
        return "trtllm"

    def is_buffer_size_sufficient(
        self,
        tp_size: int,
        num_tokens: int,
        hidden_dim: int,
        dtype: torch.dtype,
        use_oneshot: bool | None = None,
    ) -> bool:
        return self._fits(self.check_call(tp_size, num_tokens, hidden_dim, dtype, use_oneshot))

    def check_call(self, tp_size, num_tokens, hidden_dim, dtype, use_oneshot=None) -> list[str]:
        """Every reason a call of this shape does not fit (empty when it fits; the sizes as in
        ``is_buffer_size_sufficient``)."""
        m = self.metadata
        problems = metadata_problems(m, tp_size, num_tokens, hidden_dim, dtype)
        if use_oneshot and not problems:
            need = tp_size * num_tokens * hidden_dim * ELEMENT_SIZE[dtype]
            if need > m["lamport_comm_size"]:
                problems.append(
                    f"one-shot needs {need} bytes per Lamport segment, the "
                    f"workspace has {m['lamport_comm_size']}"
                )
        return problems

    def _release(self) -> None:
        _destroy("TRTLLMAllReduceFusionWorkspace.destroy", self.ipc_handles)

    def __repr__(self) -> str:
        return (
            f"TRTLLMAllReduceFusionWorkspace(rank={self.rank}, world_size={self.world_size}, "
            f"max_token_num={self.max_token_num}, hidden_dim={self.hidden_dim}, "
            f"dtype={self.dtype}, destroyed={self._destroyed})"
        )


def metadata_problems(
    metadata: Any, world_size: int, token_num: int, hidden_dim: int, dtype: torch.dtype
) -> list[str]:
    """Why a call does not match a workspace's metadata (empty list: it does)."""
    if not isinstance(metadata, dict):
        return [f"metadata must be a dict, got {type(metadata).__name__}"]
    missing = [
        k
        for k in ("max_token_num", "tp_size", "hidden_dim", "use_fp32_lamport")
        if k not in metadata
    ]
    problems = [f"metadata lacks {k!r}" for k in missing]
    if "tp_size" not in missing and world_size != metadata["tp_size"]:
        problems.append(
            f"world_size ({world_size}) != the workspace's tp_size ({metadata['tp_size']})"
        )
    if "max_token_num" not in missing and "hidden_dim" not in missing:
        capacity = metadata["max_token_num"] * metadata["hidden_dim"]
        if token_num * hidden_dim > capacity:
            problems.append(
                f"token_num * hidden_dim ({token_num} * {hidden_dim} = "
                f"{token_num * hidden_dim}) exceeds the workspace's capacity "
                f"max_token_num * hidden_dim ({metadata['max_token_num']} * "
                f"{metadata['hidden_dim']} = {capacity})"
            )
    if "use_fp32_lamport" not in missing and metadata["use_fp32_lamport"] != (
        dtype == torch.float32
    ):
        problems.append(
            f"dtype {dtype} does not match the workspace (use_fp32_lamport="
            f"{metadata['use_fp32_lamport']})"
        )
    return problems


def _single_node(backend, gpus_per_node: int | None, world_size: int) -> bool:
    if gpus_per_node is not None:
        return world_size <= gpus_per_node
    hosts = backend.allgather(socket.gethostname())
    return len(set(hosts)) == 1


def create_allreduce_fusion_workspace(
    backend: str = "auto",
    world_size: int | None = None,
    rank: int | None = None,
    max_token_num: int | None = None,
    hidden_dim: int | None = None,
    dtype: torch.dtype | None = None,
    gpus_per_node: int | None = None,
    comm_backend: Any = None,
    force_oneshot_support: bool = False,
    group: Any = None,
    *,
    timeout_s: float | None = None,
) -> AllReduceFusionWorkspace:
    """Create the workspace that selects allreduce_fusion's backend. Collective.

    ``backend``: ``"trtllm"`` (the Lamport kernels over CUDA IPC, one node), ``"mnnvl"``
    (the same kernels over peer-mapped rows at one stride, one node: an
    MNNVLAllReduceFusionWorkspace; across nodes it raises NotImplementedError) or ``"auto"``
    (``"trtllm"`` when every rank is on one node: decided from ``gpus_per_node`` when given,
    else by comparing host names through the communicator; ``"mnnvl"`` otherwise). Nothing
    needs NVLink multicast.
    ``world_size``/``rank``: the group's (``comm_backend`` or ``group``, default WORLD).
    ``max_token_num * hidden_dim`` elements of ``dtype`` is the largest call; every smaller
    or reshaped call fits (see ``is_buffer_size_sufficient``). ``force_oneshot_support``:
    ``"mnnvl"`` sizes its buffers for one-shot up to ``max_token_num`` tokens (else one-shot
    up to the 1 MiB threshold, two-shot beyond); ``"trtllm"`` always supports one-shot up to
    its capacity (below MAX_COMM_SIZE per Lamport segment). ``timeout_s`` bounds waits for peers.
    """
    op = "create_allreduce_fusion_workspace"
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a str, got {type(backend).__name__}")
    if backend not in ("auto", "trtllm", "mnnvl"):
        raise RuntimeError(
            f"{op}: unknown backend {backend!r} (choose 'auto', 'trtllm' or 'mnnvl')"
        )
    for name, value in (
        ("world_size", world_size),
        ("rank", rank),
        ("max_token_num", max_token_num),
        ("hidden_dim", hidden_dim),
        ("dtype", dtype),
    ):
        if value is None:
            raise ValueError(f"{op}: {name} is required")
    int_arg(op, "world_size", world_size, 1)
    int_arg(op, "rank", rank, 0)
    int_arg(op, "max_token_num", max_token_num, 1)
    int_arg(op, "hidden_dim", hidden_dim, 1)
    _dtype_arg(op, dtype)
    if gpus_per_node is not None:
        int_arg(op, "gpus_per_node", gpus_per_node, 1)
    if not isinstance(force_oneshot_support, bool):
        raise TypeError(f"{op}: force_oneshot_support must be a bool")
    _timeout_arg(op, timeout_s)
    comm = _group_backend(op, comm_backend, group, rank, world_size)
    if backend == "mnnvl" or (
        backend == "auto" and not _single_node(comm, gpus_per_node, world_size)
    ):
        return _BACKENDS["mnnvl"](
            comm, world_size, rank, max_token_num, hidden_dim, dtype, gpus_per_node,
            force_oneshot_support, timeout_s,
        )  # fmt: skip
    return TRTLLMAllReduceFusionWorkspace(
        world_size, rank, max_token_num, hidden_dim, dtype, comm_backend=comm, timeout_s=timeout_s
    )
