"""A vLLM-style all-reduce communicator for one rank of a test or benchmark.

Each rank allocates two IPC-shared buffers, a meta buffer (signal header + scratch) and a staging
buffer, zeroes its signal header, creates the handle and registers the staging buffer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..dlpack_utils import pack_strided_memory
from ..ops import vllm_ar
from ..runtime.cuda_ipc import create_shared_buffer, free_shared_buffer


class VllmComm:
    def __init__(
        self,
        max_bytes: int,
        *,
        timeout_s: float | None = None,
        rank_data_records: int = 4096,
        group=None,
    ):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.max_bytes = max_bytes
        meta_bytes = vllm_ar.vllm_meta_size() + max_bytes
        self.meta = create_shared_buffer(meta_bytes, group=group)
        torch.cuda.synchronize()
        own_meta = pack_strided_memory(
            self.meta[self.rank],
            meta_bytes,
            meta_bytes,
            1,
            torch.uint8,
            torch.cuda.current_device(),
        )
        own_meta.zero_()
        self.buffer = create_shared_buffer(max_bytes, group=group)
        self.rank_data = torch.empty(rank_data_records * 64, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        dist.barrier(group)
        self.fa = vllm_ar.vllm_init_custom_ar(
            self.meta, self.rank_data, self.rank, True, timeout_s=timeout_s
        )
        vllm_ar.vllm_register_buffer(self.fa, self.buffer)

    def buffer_view(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """This rank's staging buffer as a 1-D tensor (a registered input for in-place reads)."""
        elem = torch.tensor([], dtype=dtype).element_size()
        view = pack_strided_memory(
            self.buffer[self.rank],
            self.max_bytes,
            self.max_bytes,
            1,
            dtype,
            torch.cuda.current_device(),
        )
        if numel * elem > self.max_bytes:
            raise ValueError(
                f"buffer_view: {numel} x {dtype} exceeds the {self.max_bytes}-byte buffer"
            )
        return view.view(-1)[:numel]

    def all_reduce(
        self,
        inp: torch.Tensor,
        out: torch.Tensor | None = None,
        num_ctas: int = 36,
        algorithm: str = "auto",
    ) -> torch.Tensor:
        """Eager all-reduce staged through the registered buffer."""
        out = torch.empty_like(inp) if out is None else out
        vllm_ar.vllm_all_reduce(
            self.fa, inp, out, self.buffer[self.rank], self.max_bytes, num_ctas, algorithm=algorithm
        )
        return out

    def register_graph_inputs(self) -> int:
        """After capture: exchange and register the captured inputs on every rank."""
        handles, offsets = vllm_ar.vllm_get_graph_buffer_ipc_meta(self.fa)
        gathered = [None] * self.world
        dist.all_gather_object(gathered, (handles, offsets), group=self.group)
        vllm_ar.vllm_register_graph_buffers(
            self.fa, [g[0] for g in gathered], [g[1] for g in gathered]
        )
        return len(offsets)

    def close(self) -> None:
        torch.cuda.synchronize()
        dist.barrier(self.group)
        vllm_ar.vllm_dispose(self.fa)
        free_shared_buffer(self.meta, group=self.group)
        free_shared_buffer(self.buffer, group=self.group)

    def __enter__(self) -> VllmComm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
