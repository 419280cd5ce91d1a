"""The MNNVL all-reduce workspace: rows at one stride, served by the Lamport fusion kernels.

Every rank of a tensor-parallel group owns one row of device memory that every peer maps, all
rows at one stride in one address range (``runtime/peer_memory.py``: CUDA virtual memory whose
pages travel between the processes as POSIX file descriptors; unicast mappings only). With
``B = buffer_size_bytes`` a row holds::

    offset      bytes   what
    0           3 B     three Lamport buffers (buffer i at i*B), filled with fp32 -0.0 words
    3 B         B       the two-shot region: staged rows, then the reduced rows
    4 B         F       the kernels' flags (meetings, abort marks, call announcements), zero

The kernels are the Lamport fusion kernels of ``include/fusedcomm/kernels`` (one-shot and
two-shot), unchanged: they find every rank's buffers through a pointer table, which this
workspace fills from the mapped rows (``comm_q = row_q + 3B``, ``flags_q = row_q + 4B``,
``lamport_q = row_q``) and binds to its own control block. There is no multicast object: where
a multicast-based implementation broadcasts with one store, these kernels store once per rank
through the peer mapping (see docs/mnnvl-allreduce.md for what that costs).

Sizing (``B``), ``buffer_flags`` and the attributes follow the reference API; ``mc_ptr`` is
documented on the class.
"""

from __future__ import annotations

import enum
import math
import socket
import weakref
from typing import Any

import torch

from ..enums import MAX_COMM_SIZE, MNNVL_ONE_SHOT_THRESHOLD
from . import fusion_control as _fusion_launch
from .comm_backend import local_step as _local_step
from .fusion_workspace import AllReduceFusionWorkspace, _timeout_arg, register_backend

__all__ = [
    "MNNVLAllReduceFusionWorkspace",
    "MNNVLAllreduceFusionStrategy",
    "MNNVLQuantType",
    "create_mnnvl_workspace",
    "live_workspace",
]

MIN_RANKS, MAX_RANKS = 2, 64  # the API's world sizes
_ELEM = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


class MNNVLAllreduceFusionStrategy(enum.Enum):
    """How an MNNVL call moves its data: ONESHOT (every rank pushes its rows to every rank),
    TWOSHOT (reduce-scatter, then all-gather of the reduced rows), AUTO (by payload size)."""

    ONESHOT = 0
    TWOSHOT = 1
    AUTO = 99

    @staticmethod
    def select_strategy(
        tp_size: int, num_tokens: int, hidden_dim: int, dtype: torch.dtype
    ) -> MNNVLAllreduceFusionStrategy:
        """ONESHOT iff ``num_tokens * hidden_dim * tp_size * elem`` <= 1 MiB, else TWOSHOT."""
        elem = dtype.itemsize
        if num_tokens * hidden_dim * tp_size * elem <= MNNVL_ONE_SHOT_THRESHOLD:
            return MNNVLAllreduceFusionStrategy.ONESHOT
        return MNNVLAllreduceFusionStrategy.TWOSHOT


class MNNVLQuantType:
    """The quantiser of trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant (plain ints)."""

    NONE = 0
    FP8 = 1  # static per-tensor E4M3 (divides by the scale)
    NVFP4 = 2  # E2M1 with E4M3 block scales (multiplies by the global scale)
    DYNAMIC_FP8 = 3  # per-token E4M3 with fp32 scales


class MissingSizeError(ValueError, AssertionError):
    """A workspace asked for without a size: a ValueError, and an AssertionError as the
    reference raises for it."""


def strategy_of(op: str, strategy: Any) -> MNNVLAllreduceFusionStrategy:
    """A strategy argument: an MNNVLAllreduceFusionStrategy, or True/False/None (one-shot /
    two-shot / auto, as the unified API's ``use_oneshot``)."""
    if isinstance(strategy, MNNVLAllreduceFusionStrategy):
        return strategy
    if strategy is None:
        return MNNVLAllreduceFusionStrategy.AUTO
    if isinstance(strategy, bool):
        return (
            MNNVLAllreduceFusionStrategy.ONESHOT
            if strategy
            else MNNVLAllreduceFusionStrategy.TWOSHOT
        )
    raise TypeError(
        f"{op}: strategy must be an MNNVLAllreduceFusionStrategy, got {type(strategy).__name__}"
    )


def _required_bytes(tp_size, num_tokens, hidden_dim, dtype, strategy) -> int:
    elem = dtype.itemsize
    strategy = strategy_of("get_required_buffer_size_bytes", strategy)
    if strategy == MNNVLAllreduceFusionStrategy.AUTO:
        strategy = MNNVLAllreduceFusionStrategy.select_strategy(
            tp_size, num_tokens, hidden_dim, dtype
        )
    if strategy == MNNVLAllreduceFusionStrategy.ONESHOT:
        return num_tokens * hidden_dim * tp_size * elem
    return 2 * math.ceil(num_tokens / tp_size) * tp_size * hidden_dim * elem


def _int(op: str, name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{op}: {name} ({value}) must be {bound}")
    return value


def _backend_for(op: str, mapping: Any, comm_backend: Any):
    """The communicator of this rank's TP group (comm_backend None: MPI COMM_WORLD)."""
    from .comm_backend import MPIBackend

    backend = MPIBackend() if comm_backend is None else comm_backend
    size, rank = backend.Get_size(), backend.Get_rank()
    if size != mapping.tp_size and size == mapping.world_size:
        backend = backend.Split(min(mapping.tp_group), mapping.tp_rank)
        size, rank = backend.Get_size(), backend.Get_rank()
    if size != mapping.tp_size or rank != mapping.tp_rank:
        raise ValueError(
            f"{op}: the communicator has rank {rank} of {size}, the mapping's TP group rank "
            f"{mapping.tp_rank} of {mapping.tp_size}; pass a comm_backend over the TP group"
        )
    return backend


def _current_device() -> int:
    return torch.cuda.current_device()


def _tensor_device(device: int) -> torch.device:
    return torch.device("cuda", device)


def _synchronize(device: int | None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)


# Live workspaces of this process by the addresses the deprecated pointer entry points carry.
_LIVE: weakref.WeakValueDictionary[int, MNNVLAllReduceFusionWorkspace] = (
    weakref.WeakValueDictionary()
)


def live_workspace(op: str, buffer_ptrs_dev: Any, buffer_flags: Any):
    """The live workspace whose ``uc_ptrs_dev`` (an int or a tensor's address) or
    ``buffer_flags`` a caller passed; ValueError when neither names one."""
    keys = []
    for v in (buffer_ptrs_dev, buffer_flags):
        if isinstance(v, torch.Tensor):
            keys.append(v.data_ptr())
        elif isinstance(v, int) and not isinstance(v, bool):
            keys.append(v)
    for k in keys:
        ws = _LIVE.get(k)
        if ws is not None and not ws.destroyed:
            return ws
    raise ValueError(
        f"{op}: buffer_ptrs_dev / buffer_flags_mnnvl do not belong to a live "
        "MNNVLAllReduceFusionWorkspace of this process (destroyed, or not from "
        "get_allreduce_mnnvl_workspace)"
    )


class MNNVLAllReduceFusionWorkspace(AllReduceFusionWorkspace):
    """The MNNVL all-reduce workspace of one tensor-parallel group on one node.

    Collective over ``comm_backend`` (the TP group's communicator; a communicator over the
    whole ``mapping`` is split into TP groups; None: MPI COMM_WORLD). Sizing: with
    ``buffer_size_in_bytes`` None, ``max_num_tokens``, ``hidden_dim`` and ``dtype`` are
    required and each Lamport buffer holds the larger of one-shot at
    ``min(1 MiB / (W * elem * D), max_num_tokens)`` tokens and two-shot at ``max_num_tokens``
    tokens; the size is rounded up to 32 bytes and must stay below 2**32. ``timeout_s``
    bounds every wait of a kernel for a peer (default FUSEDCOMM_TIMEOUT_S).

    Attributes (engines read them): ``backend`` ("mnnvl"), ``tp_size``, ``rank`` (the TP
    rank), ``world_size`` (the mapping's), ``buffer_size_bytes`` (B, one Lamport buffer),
    ``workspace_size_bytes`` (3 B: the Lamport buffers), ``row_bytes`` (what each rank maps
    per peer: 4 B plus the flags), ``uc_ptrs_dev`` (device address of ``tp_size`` uint64
    row addresses), ``uc_ptr_local`` (this rank's row), ``ptrs`` (the row addresses, host),
    ``buffer_flags`` (uint32[9], initialised as the reference does: ``[0, 2, B, 0, 0, 0, 0,
    0, 0]``; it identifies the workspace to the deprecated pointer entry points, and the
    kernels keep their state in the workspace's control block, so it does not change),
    ``handle`` (the :class:`~fusedcomm.runtime.peer_memory.PeerMemory` of the rows) and
    ``workspace_tensor`` (the kernels' pointer table).

    ``mc_ptr``: there is no multicast object, ever. ``mc_ptr`` equals ``uc_ptr_local``: a
    non-zero address (engines that take 0 for "no workspace" keep this one) at which a store
    reaches this rank's own row only. It is never a multimem address.

    World sizes 2 to 64 pass the argument checks; the kernels run up to 8 ranks, on one node
    (larger groups and groups across nodes raise NotImplementedError on every rank).
    """

    NUM_LAMPORT_BUFFERS = 3
    TWOSHOT_NUM_STAGES = 2
    PACKED_ALIGNMENT_BYTES = 16

    def __init__(
        self,
        mapping: Any,
        max_num_tokens: int | None = None,
        hidden_dim: int | None = None,
        dtype: torch.dtype | None = None,
        buffer_size_in_bytes: int | None = None,
        comm_backend: Any = None,
        *,
        timeout_s: float | None = None,
    ):
        op = "MNNVLAllReduceFusionWorkspace"
        self._destroyed = True  # until created: a failed __init__ leaves nothing to free
        for attr in ("tp_size", "tp_rank", "world_size", "rank", "tp_group"):
            if not hasattr(mapping, attr):
                raise TypeError(f"{op}: mapping must be a Mapping (it has no {attr})")
        tp_size = _int(op, "mapping.tp_size", mapping.tp_size, MIN_RANKS, MAX_RANKS)
        buffer = self._sizing(op, tp_size, max_num_tokens, hidden_dim, dtype, buffer_size_in_bytes)
        timeout = _timeout_arg(op, timeout_s)
        limit = int(_fusion_launch._describe()["max_ranks"])
        if tp_size > limit:
            raise NotImplementedError(
                f"{op}: tp_size ({tp_size}) exceeds the {limit} ranks the kernels run on one "
                "node; larger groups need a multi-node NVLink fabric, which fusedcomm does not "
                "support"
            )
        backend = _backend_for(op, mapping, comm_backend)
        hosts = backend.allgather(socket.gethostname())
        if len(set(hosts)) != 1:
            raise NotImplementedError(
                f"{op}: the TP group spans several nodes ({sorted(set(hosts))}); fusedcomm's MNNVL "
                "workspace maps peer memory within one node only; use NCCL across nodes"
            )
        super().__init__(mapping.world_size, mapping.tp_rank)
        self._destroyed = True  # until _create has finished
        self.tp_size, self.rank = tp_size, mapping.tp_rank
        self._create(op, backend, buffer, timeout)

    # -- sizing ---------------------------------------------------------------------------

    @classmethod
    def _sizing(cls, op, tp_size, max_num_tokens, hidden_dim, dtype, buffer_size_in_bytes) -> int:
        if buffer_size_in_bytes is None:
            if max_num_tokens is None or hidden_dim is None or dtype is None:
                raise MissingSizeError(
                    f"{op}: max_num_tokens, hidden_dim and dtype are required when "
                    "buffer_size_in_bytes is not given"
                )
            _int(op, "max_num_tokens", max_num_tokens, 1)
            _int(op, "hidden_dim", hidden_dim, 1)
            if dtype not in _ELEM:
                raise TypeError(f"{op}: dtype ({dtype}) must be float16, bfloat16 or float32")
            oneshot_tokens = min(
                MNNVL_ONE_SHOT_THRESHOLD // (tp_size * _ELEM[dtype] * hidden_dim), max_num_tokens
            )
            buffer = max(
                cls.get_required_buffer_size_bytes(
                    tp_size,
                    oneshot_tokens,
                    hidden_dim,
                    dtype,
                    MNNVLAllreduceFusionStrategy.ONESHOT,
                ),
                cls.get_required_buffer_size_bytes(
                    tp_size,
                    max_num_tokens,
                    hidden_dim,
                    dtype,
                    MNNVLAllreduceFusionStrategy.TWOSHOT,
                ),
            )
        else:
            buffer = _int(op, "buffer_size_in_bytes", buffer_size_in_bytes, 1)
        align = cls.TWOSHOT_NUM_STAGES * cls.PACKED_ALIGNMENT_BYTES
        buffer = -(-max(buffer, 1) // align) * align
        if buffer > 2**32 - 1:
            raise ValueError(
                f"{op}: the buffer size in bytes {buffer} is greater than the maximum "
                "supported size (UINT32_MAX)"
            )
        return buffer

    @staticmethod
    def get_required_buffer_size_bytes(
        tp_size: int,
        num_tokens: int,
        hidden_dim: int,
        dtype: torch.dtype,
        strategy: MNNVLAllreduceFusionStrategy = MNNVLAllreduceFusionStrategy.AUTO,
    ) -> int:
        """Bytes one Lamport buffer needs for a call: one-shot ``N * D * W * elem``, two-shot
        ``2 * ceil(N / W) * W * D * elem`` (AUTO resolves by ``select_strategy``). Pure."""
        return _required_bytes(tp_size, num_tokens, hidden_dim, dtype, strategy)

    def check_call(self, tp_size, num_tokens, hidden_dim, dtype, strategy=None) -> list[str]:
        """Every reason a call of this shape does not fit (empty when it fits)."""
        if tp_size != self.tp_size:
            return [f"tp_size ({tp_size}) != the workspace's ({self.tp_size})"]
        if dtype not in _ELEM:
            return [f"dtype {dtype} is not float16, bfloat16 or float32"]
        strategy = strategy_of("is_buffer_size_sufficient", strategy)
        if strategy == MNNVLAllreduceFusionStrategy.AUTO:
            strategy = MNNVLAllreduceFusionStrategy.select_strategy(
                tp_size, num_tokens, hidden_dim, dtype
            )
        need = _required_bytes(tp_size, num_tokens, hidden_dim, dtype, strategy)
        have = self.buffer_size_bytes
        if strategy == MNNVLAllreduceFusionStrategy.ONESHOT:
            have = min(have, MAX_COMM_SIZE)
        if need > have:
            return [f"{strategy.name} needs {need} bytes per buffer, the workspace has {have}"]
        return []

    def is_buffer_size_sufficient(
        self,
        tp_size: int,
        num_tokens: int,
        hidden_dim: int,
        dtype: torch.dtype,
        strategy: Any = MNNVLAllreduceFusionStrategy.AUTO,
    ) -> bool:
        """Whether a call of this shape fits (``strategy``: an MNNVLAllreduceFusionStrategy,
        or the unified API's ``use_oneshot`` True / False / None)."""
        return not self.check_call(tp_size, num_tokens, hidden_dim, dtype, strategy)

    @property
    def backend(self) -> str:
        return "mnnvl"

    # -- creation and release ---------------------------------------------------------------

    def _create(self, op: str, backend, buffer: int, timeout: float | None) -> None:
        from . import lamport, peer_memory

        flags = int(_fusion_launch.workspace_bytes(self.tp_size, 1, 8, torch.bfloat16)["flags"])
        row = 4 * buffer + flags
        device = _current_device()
        memory = peer_memory.PeerMemory(row, backend, device)
        self._memory, self._control = memory, None
        try:
            rows = [memory.row_ptr(q) for q in range(self.tp_size)]

            def fill() -> None:
                # fp32 sentinel words whatever the dtype: every reader takes them for empty
                lamport.trtllm_lamport_initialize(rows[self.rank], 3 * buffer // 4, torch.float32)
                _synchronize(device)
                self._control = _fusion_launch.new_control_block(
                    device, min(buffer, MAX_COMM_SIZE), buffer, timeout
                )
                table = (
                    [r + 3 * buffer for r in rows]  # the two-shot regions
                    + [r + 4 * buffer for r in rows]  # the flags
                    + rows  # the Lamport buffers
                    + [int(self._control.ptr)]
                )
                cuda = _tensor_device(device)
                self.workspace_tensor = torch.tensor(table, dtype=torch.int64, device=cuda)
                self._control.attach(self.workspace_tensor)
                self._uc_ptrs = torch.tensor(rows, dtype=torch.int64, device=cuda)
                self.buffer_flags = torch.tensor(
                    [0, 2, buffer, 0, 0, 0, 0, 0, 0], dtype=torch.uint32, device=cuda
                )
                _synchronize(device)

            _local_step(backend, op, "initialising the buffers", fill)
            backend.barrier()  # no rank pushes into a peer's row before the peer has filled it
        except BaseException:
            self._free()
            raise
        self.buffer_size_bytes = buffer
        self.workspace_size_bytes = self.NUM_LAMPORT_BUFFERS * buffer
        self.row_bytes = memory.row_stride
        self.handle = memory
        self.ptrs = rows
        self.uc_ptrs_dev = int(self._uc_ptrs.data_ptr())
        self.uc_ptr_local = rows[self.rank]
        self.mc_ptr = self.uc_ptr_local
        self.device = device
        self._destroyed = False
        _LIVE[self.uc_ptrs_dev] = self
        _LIVE[self.buffer_flags.data_ptr()] = self

    @property
    def control(self):
        """The kernels' control block of this workspace (protocol state, failure record)."""
        return self._control

    def _free(self) -> None:
        _synchronize(getattr(self, "device", None))
        control, self._control = getattr(self, "_control", None), None
        memory, self._memory = getattr(self, "_memory", None), None
        try:
            if control is not None:
                control.close()
        finally:
            if memory is not None:
                memory.close()  # the pages live on until every rank has unmapped them

    def _release(self) -> None:
        for key in (getattr(self, "uc_ptrs_dev", None), self._flags_key()):
            if key is not None and _LIVE.get(key) is self:
                del _LIVE[key]
        self._free()

    def _flags_key(self) -> int | None:
        flags = getattr(self, "buffer_flags", None)
        return None if flags is None else flags.data_ptr()

    def __repr__(self) -> str:
        return (
            f"MNNVLAllReduceFusionWorkspace(rank={self.rank}, tp_size={self.tp_size}, "
            f"buffer_size_bytes={getattr(self, 'buffer_size_bytes', None)}, "
            f"destroyed={self._destroyed})"
        )


def create_mnnvl_workspace(
    comm: Any,
    world_size: int,
    rank: int,
    max_token_num: int,
    hidden_dim: int,
    dtype: torch.dtype,
    gpus_per_node: int | None,
    force_oneshot_support: bool,
    timeout_s: float | None,
) -> MNNVLAllReduceFusionWorkspace:
    """create_allreduce_fusion_workspace's "mnnvl" branch (arguments already checked; ``comm``
    is the group's communicator): a mapping with ``tp_size = world_size`` and a workspace
    sized for one-shot (and two-shot) up to ``max_token_num`` tokens when
    ``force_oneshot_support``."""
    from ..mapping import Mapping

    if gpus_per_node is not None and world_size > gpus_per_node:
        raise NotImplementedError(
            f"create_allreduce_fusion_workspace: the group spans several nodes ({world_size} "
            f"ranks, {gpus_per_node} GPUs per node); fusedcomm's MNNVL workspace maps peer "
            "memory within one node only; use NCCL across nodes"
        )
    # None: the host names decide (the workspace compares them), whatever torch sees
    gpus_per_node = world_size if gpus_per_node is None else gpus_per_node
    mapping = Mapping(world_size, rank, gpus_per_node, tp_size=world_size)
    buffer = None
    if force_oneshot_support:
        buffer = max(
            _required_bytes(world_size, max_token_num, hidden_dim, dtype, s)
            for s in (MNNVLAllreduceFusionStrategy.ONESHOT, MNNVLAllreduceFusionStrategy.TWOSHOT)
        )
    return MNNVLAllReduceFusionWorkspace(
        mapping, max_token_num, hidden_dim, dtype, buffer, comm, timeout_s=timeout_s
    )


register_backend("mnnvl", create_mnnvl_workspace)
