"""The fused unicast modes of mixed communication: their rows of peer memory and the launch.

Every rank of the node owns one row (``fusedcomm.runtime.mixed_comm_workspace``:
MixedCommLayout), mapped by every peer at one stride through
``fusedcomm.runtime.peer_memory`` (unicast VMM mappings; no multicast). The kernels and the
protocol: ``include/fusedcomm/kernels/mixed_comm.cuh``. Every wait for a peer is bounded
(``timeout_s`` of the handler, default ``FUSEDCOMM_TIMEOUT_S``); a rank that gives up tells its
peers, and from then on the handler's fused modes raise a
:class:`~fusedcomm.CommFailureError` on every rank (create a new handler).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .. import envs
from ..runtime.failures import FailureState, FamilyNames
from ..runtime.mixed_comm_workspace import (
    MIXED_MAX_BLOCKS,
    MIXED_MAX_LOCAL,
    MIXED_SLOT_BYTES,
    SCATTER_OPS,
    MixedCommLayout,
    MixedCommMode,
    MixedCommOp,
    MixedTopology,
)

__all__ = ["FusedMixedComm", "fused_supported"]

_SENTINEL_16 = -32768  # 0x8000: -0.0 of fp16 / bf16, as int16


@functools.cache
def _module():
    from ..jit import load_module

    return load_module("mixed_comm")


@functools.cache
def _names() -> FamilyNames:
    d = dict(_module().mixed_comm_describe())
    return FamilyNames(op=str(d["op"]), phases=tuple(str(p) for p in d["phases"]))


def fused_supported(topo: MixedTopology, device: torch.device) -> bool:
    """Whether the fused unicast modes run for this layout on ``device``: one node, at most 8
    local ranks, an SM 9.0 or newer GPU. Every rank of a node decides the same way for the
    same GPUs (the handler checks the layout is the same everywhere)."""
    if topo.inter_size != 1 or not 2 <= topo.local_size <= MIXED_MAX_LOCAL:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


class FusedMixedComm:
    """The rows, failure state and launch record of one handler's fused modes (collective)."""

    def __init__(
        self,
        topo: MixedTopology,
        dtype: torch.dtype,
        device: torch.device,
        grid_size: int,
        timeout_s: float | None,
    ):
        op = "MixedCommHandler"
        timeout = envs.default_timeout_s() if timeout_s is None else timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"{op}: timeout_s must be a number of seconds, got {timeout_s!r}")
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"{op}: timeout_s ({timeout_s}) must be a positive number")
        facts = dict(_module().mixed_comm_describe())
        layout = MixedCommLayout(topo.local_size)
        mirrored = {
            "max_blocks": MIXED_MAX_BLOCKS,
            "slot_bytes": MIXED_SLOT_BYTES,
            "max_local": MIXED_MAX_LOCAL,
        }
        row_bytes = int(_module().mixed_comm_row_bytes(topo.local_size))
        if any(int(facts[k]) != v for k, v in mirrored.items()) or row_bytes != (
            layout.size_per_rank
        ):
            raise RuntimeError(
                f"{op}: the mixed_comm module's layout ({facts}, row {row_bytes} bytes) differs "
                f"from fusedcomm.runtime.mixed_comm_workspace's (row {layout.size_per_rank})"
            )
        from ..runtime.comm_backend import TorchDistBackend
        from ..runtime.peer_memory import PeerMemory

        self.topo, self.dtype, self.device, self.grid = topo, dtype, device, grid_size
        self.launch_shape = {"block_size": int(facts["threads"]),
                             "max_blocks": min(grid_size, MIXED_MAX_BLOCKS)}  # fmt: skip
        self.failure: FailureState | None = None
        index = device.index
        _module().mixed_comm_prepare(index)  # loaded before any rank's first launch
        self.memory = PeerMemory(row_bytes, TorchDistBackend(), index)
        try:
            rank = topo.local_rank
            with torch.cuda.device(index):
                rows = self.memory.as_tensor()
                rows[rank, layout.slots :].view(torch.int16).fill_(_SENTINEL_16)
                torch.cuda.current_stream().synchronize()
            del rows
            self.failure = FailureState(index, _names())
            import tvm_ffi

            self.record = tvm_ffi.convert(
                [
                    index,
                    self.memory.base_ptr,
                    self.memory.row_stride,
                    row_bytes,
                    topo.local_size,
                    rank,
                    self.failure.claim_ptr,
                    self.failure.record_device_ptr,
                    int(timeout * 1e9),
                ]
            )
            torch.distributed.barrier()  # every row holds its sentinels before any launch
        except BaseException:
            self.close()
            raise

    def run(
        self, op: MixedCommOp, mode: MixedCommMode, x_in: torch.Tensor, x_out: torch.Tensor
    ) -> None:
        if self.failure is None:
            raise RuntimeError("run_mixed_comm: the handler's fused modes are closed")
        self.failure.check("run_mixed_comm")
        topo = self.topo
        _module().mixed_comm_launch(
            x_in,
            x_out,
            self.record,
            op in SCATTER_OPS,
            mode == MixedCommMode.FUSED_OPT_BYTES1_UC,
            topo.local_tp_size,
            topo.local_dp_size,
            self.grid,
        )

    def close(self) -> None:
        """Unmap the rows and free the failure state (this rank; the handler meets first)."""
        memory: Any = getattr(self, "memory", None)
        if memory is not None:
            memory.close()
            self.memory = None
        if self.failure is not None:
            self.failure.close()
            self.failure = None
