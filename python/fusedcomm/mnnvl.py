"""The names engines import from the MNNVL sub-module path (``<package>.mnnvl``).

The communication backends (the same objects as at the top level; ``MnnvlConfig.comm_backend``
is also how :class:`~fusedcomm.MoeAlltoAll` can be told which group exchanges its memory
handles), capability reports (:func:`is_mnnvl_fabric_supported`, :func:`is_multicast_supported`:
they query attributes only and never create, bind or map anything), :func:`all_ranks_agree`,
and :class:`MnnvlMemory`: rows of peer-mapped memory at one stride within one node, through
CUDA virtual memory and POSIX file descriptors (no fabric handles).

fusedcomm never uses NVLink multicast, so :class:`McastGPUBuffer` raises: its callers want a
multicast address, which nothing here provides. The MNNVL all-reduce workspace
(:class:`~fusedcomm.MNNVLAllReduceFusionWorkspace`) is its unicast replacement.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from .runtime.comm_backend import CommBackend, MnnvlConfig, MPIBackend, TorchDistBackend

__all__ = [
    "CommBackend",
    "MPIBackend",
    "McastGPUBuffer",
    "MnnvlConfig",
    "MnnvlMemory",
    "TorchDistBackend",
    "all_ranks_agree",
    "all_ranks_support_mnnvl",
    "is_mnnvl_fabric_supported",
    "is_multicast_supported",
]

_ATTR_FABRIC = 128  # CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED
_ATTR_MULTICAST = 132  # CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED
_NVML_FABRIC_STATE_COMPLETED = 3


def _attribute(device_idx: int | None, attr: int) -> int:
    from .runtime.capability import _driver

    if device_idx is None:
        device_idx = torch.cuda.current_device()
    drv = _driver()
    return drv.attribute(drv.device(int(device_idx)), attr, unknown_as=0)


def _nvml_fabric_complete(device_idx: int) -> bool:
    """NVML says the GPU has joined an NVLink fabric cluster (state completed, cluster id)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_idx)
        info = pynvml.c_nvmlGpuFabricInfoV_t()
        pynvml.nvmlDeviceGetGpuFabricInfoV(handle, ctypes.byref(info))
        cluster = bytes(info.clusterUuid)[:1]
        return info.state >= _NVML_FABRIC_STATE_COMPLETED and cluster not in (b"", b"\0")
    finally:
        pynvml.nvmlShutdown()


def is_mnnvl_fabric_supported(device_idx: int | None = None) -> bool:
    """Whether the GPU can share memory over a multi-node NVLink fabric: the driver reports
    FABRIC handles and NVML reports the GPU in a fabric cluster. False when either is missing
    or cannot be asked (no driver, no pynvml). A report only; fusedcomm itself maps peer
    memory within one node, whatever this says."""
    try:
        if not _attribute(device_idx, _ATTR_FABRIC):
            return False
        index = torch.cuda.current_device() if device_idx is None else int(device_idx)
        return _nvml_fabric_complete(index)
    except Exception:  # noqa: BLE001 - a capability report: unknown is "no"
        return False


def is_multicast_supported(device_idx: int | None = None) -> bool:
    """Whether the driver reports NVLink multicast (CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED)
    for the GPU. A report only: nothing is created, and fusedcomm never uses multicast."""
    try:
        return bool(_attribute(device_idx, _ATTR_MULTICAST))
    except Exception:  # noqa: BLE001
        return False


def all_ranks_agree(comm: Any, local: bool) -> bool:
    """True iff ``local`` is true on every rank of ``comm`` (an all-gather; collective)."""
    return all(bool(v) for v in comm.allgather(bool(local)))


def all_ranks_support_mnnvl(
    local_supported: bool, world_size: int, comm_backend: Any = None, group: Any = None
) -> bool:
    """AND of ``local_supported`` over the group (collective; call it on every rank). A
    communicator whose size is not ``world_size`` votes no."""
    if world_size <= 1:
        return bool(local_supported)
    from .runtime.comm_backend import resolve_backend

    comm = resolve_backend(comm_backend, group)
    if comm.Get_size() != world_size:
        return False
    return all_ranks_agree(comm, local_supported)


class McastGPUBuffer:
    """Not available: fusedcomm never creates NVLink multicast objects.

    Use :class:`~fusedcomm.MNNVLAllReduceFusionWorkspace` (unicast rows; its ``mc_ptr`` is
    documented there) or :class:`MnnvlMemory`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        raise NotImplementedError(
            "McastGPUBuffer: fusedcomm uses no NVLink multicast, so it has no multicast buffer; "
            "use MNNVLAllReduceFusionWorkspace (unicast peer rows) or MnnvlMemory instead"
        )


class MnnvlMemory:
    """One row of device memory per rank of a group, every row mapped on every rank at one
    stride (within one node; CUDA virtual memory over POSIX file descriptors).

    ``MnnvlMemory(mapping, size)`` is collective over this rank's TP group of ``mapping`` (the
    ranks sharing its PP and CP ranks, ordered by TP rank), taken from the communicator that
    :meth:`set_comm_from_config` set (default: torch.distributed WORLD when initialised, else
    MPI). Attributes: ``ptr`` (row 0's address), ``rank_stride`` (bytes between rows),
    ``segment_size`` (``size``), ``mapping``. :meth:`as_torch_strided_tensor` views the rows
    as ``[W, size / elem]``. Rows start zeroed and are unmapped when this object is collected
    (or on :meth:`close`).
    """

    comm: Any = None
    config: MnnvlConfig | None = None
    initialized = False

    def __init__(self, mapping: Any, size: int):
        from .runtime.peer_memory import PeerMemory

        self.mapping = mapping
        self.segment_size = size
        self._memory = PeerMemory(size, MnnvlMemory.get_comm(mapping))
        self.ptr = self._memory.base_ptr
        self.rank_stride = self._memory.row_stride

    @staticmethod
    def initialize() -> None:
        """Start the CUDA context of the current device (kept for compatibility)."""
        if not MnnvlMemory.initialized:
            torch.empty(1, device="cuda")
            MnnvlMemory.initialized = True

    @staticmethod
    def set_comm_from_config(mapping: Any, config: MnnvlConfig | None = None) -> None:
        """Use ``config.comm_backend`` (default MPI) for later allocations, split into TP
        groups."""
        MnnvlMemory.config = config or MnnvlConfig(comm_backend=MPIBackend())
        backend = MnnvlMemory.config.comm_backend or MPIBackend()
        MnnvlMemory.comm = backend.Split(
            mapping.pp_rank * mapping.cp_size + mapping.cp_rank, mapping.tp_rank
        )

    @staticmethod
    def get_comm(mapping: Any) -> Any:
        """The communicator allocations use (made on first use)."""
        if MnnvlMemory.comm is None:
            dist = torch.distributed
            world = TorchDistBackend() if dist.is_available() and dist.is_initialized() else None
            MnnvlMemory.set_comm_from_config(mapping, MnnvlConfig(comm_backend=world))
        return MnnvlMemory.comm

    @staticmethod
    def supports_mnnvl() -> bool:
        """Whether the current GPU is part of a multi-node NVLink fabric (see
        :func:`is_mnnvl_fabric_supported`)."""
        return is_mnnvl_fabric_supported()

    @property
    def mapped(self) -> bool:
        return not self._memory.closed

    def as_torch_strided_tensor(self, dtype: torch.dtype) -> torch.Tensor:
        """The rows as ``[W, size / elem]`` of ``dtype`` with row stride ``rank_stride``
        bytes; keep this object alive while the tensor is used."""
        from .dlpack_utils import pack_strided_memory

        world = MnnvlMemory.comm.Get_size()
        return pack_strided_memory(
            self.ptr, self.segment_size, self.rank_stride, world, dtype, self._memory.device
        )

    def close(self) -> None:
        """Unmap the rows on this rank (later calls do nothing)."""
        self._memory.close()

    def __del__(self) -> None:
        memory = getattr(self, "_memory", None)
        if memory is not None:
            try:
                memory.close()
            except Exception:  # noqa: BLE001 - best effort at collection
                pass
