"""The Lamport fill as a registered torch op (the functions live in ``runtime/lamport.py``)."""

from __future__ import annotations

from ..runtime.lamport import fill, trtllm_lamport_initialize, trtllm_lamport_initialize_all
from ._register import register_op

__all__ = ["trtllm_lamport_initialize", "trtllm_lamport_initialize_all"]


def _lamport_initialize_impl(buffer_ptr: int, size: int, dtype_bytes: int) -> None:
    fill("trtllm_lamport_initialize", buffer_ptr, size * dtype_bytes, dtype_bytes)


register_op(
    "trtllm_lamport_initialize(int buffer_ptr, int size, int dtype_bytes) -> ()",
    _lamport_initialize_impl,
)
