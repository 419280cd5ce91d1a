"""The control module of the fused all-reduce family, and each workspace's control block.

The control module (``jit/allreduce_fusion.py``'s host-only module; no GPU or architecture is
needed to load it) sizes the workspace buffers from the kernels' own layout and owns the
control blocks. How a launch finds a workspace's :class:`ControlBlock` without synchronising:
every control block is registered by its device address (the last entry of the pointer table).
The workspace binds the pointer table it builds to the block with :meth:`ControlBlock.attach`
(or :func:`attach_table`); a call then finds the block by the table's ``data_ptr`` (checked by
identity through a weak reference, so a new tensor at a recycled address is never confused
with the old one). A table that was never attached (e.g. a copy the caller made) is bound on
its first call by reading its last entry once, which synchronises; that is refused while a
CUDA graph is being captured.
"""

from __future__ import annotations

import functools
import weakref

import torch

from .. import envs
from .._checks import ELEMENT_SIZE
from ..jit import allreduce_fusion as specs
from ..jit import load
from .failures import FailureState, FamilyNames


@functools.cache
def _control():
    """The host-only control module (no GPU or architecture needed to load it)."""
    return load(specs.control_spec())


@functools.cache
def _describe() -> dict:
    return dict(_control().allreduce_fusion_describe())


class ControlBlock:
    """The rank-local control block of one fusion workspace (protocol state + failure record).

    ``ptr`` is its device address (the last entry of the workspace pointer table);
    ``segment_bytes`` and ``comm_bytes`` the sizes of the workspace's Lamport segment and
    two-shot buffer (the launch refuses calls that would overflow either);
    ``failure`` the workspace's FailureState (``failure.check(op)`` raises if a kernel of this
    workspace gave up on a peer). ``close()`` frees both; call it once, after the device has
    finished every call that used it.
    """

    def __init__(self, device: int, segment_bytes: int, comm_bytes: int, timeout_s: float):
        self.device, self.timeout_s = device, timeout_s
        self.segment_bytes, self.comm_bytes = segment_bytes, comm_bytes
        d = _describe()
        self.failure = FailureState(
            device, FamilyNames(str(d["op"]), tuple(str(p) for p in d["phases"]))
        )
        try:
            self.ptr = int(_control().allreduce_fusion_control_create(device, segment_bytes))
        except BaseException:
            self.failure.close()
            raise
        _BY_PTR[self.ptr] = self

    def attach(self, table: torch.Tensor) -> None:
        """Bind a pointer table (whose last entry is this block) so calls find it without a
        device read."""
        _BY_TABLE[table.data_ptr()] = (weakref.ref(table), self)

    def close(self) -> None:
        if not self.ptr:
            return
        _BY_PTR.pop(self.ptr, None)
        for key in [k for k, (_, cb) in _BY_TABLE.items() if cb is self]:
            del _BY_TABLE[key]
        _control().allreduce_fusion_control_destroy(self.device, self.ptr)
        self.ptr = 0
        self.failure.close()


_BY_PTR: dict[int, ControlBlock] = {}
_BY_TABLE: dict[int, tuple[weakref.ref, ControlBlock]] = {}


def attach_table(table: torch.Tensor) -> ControlBlock:
    """Bind ``table`` (a workspace pointer table) to its control block and return the block.
    Reads the table's last entry (synchronises); frontends call it once, at creation."""
    found = _BY_TABLE.get(table.data_ptr())
    if found is not None and found[0]() is table:
        return found[1]
    if table.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "allreduce_fusion: workspace_ptrs was never used outside a CUDA graph "
            "capture; call the op once eagerly (or attach the table) first"
        )
    ptr = int(table.reshape(-1)[-1].item())
    block = _BY_PTR.get(ptr)
    if block is None:
        raise ValueError(
            f"allreduce_fusion: workspace_ptrs names control block {ptr:#x}, which "
            "is not a live workspace of this process (destroyed?)"
        )
    block.attach(table)
    return block


def _block_for(table: torch.Tensor) -> ControlBlock:
    found = _BY_TABLE.get(table.data_ptr())
    if found is not None and found[0]() is table:
        return found[1]
    return attach_table(table)


def new_control_block(
    device: int, segment_bytes: int, comm_bytes: int, timeout_s: float | None
) -> ControlBlock:
    """Allocate and initialise a control block for a workspace whose Lamport segment is
    ``segment_bytes`` long and whose two-shot buffer holds ``comm_bytes`` (failure state
    included; ``timeout_s`` None = the default)."""
    timeout = envs.default_timeout_s() if timeout_s is None else float(timeout_s)
    return ControlBlock(device, int(segment_bytes), int(comm_bytes), timeout)


def workspace_bytes(
    world_size: int, max_token_num: int, hidden_dim: int, dtype: torch.dtype
) -> dict[str, int]:
    """Sizes of the shared buffers of one rank: comm, flags, lamport (3 segments), segment."""
    if dtype not in ELEMENT_SIZE:
        raise TypeError(
            f"fusion_workspace_bytes: dtype ({dtype}) must be float16, bfloat16 or float32"
        )
    comm, flags, lamport, segment = (
        int(v)
        for v in _control().allreduce_fusion_workspace_bytes(
            world_size, max_token_num, hidden_dim, ELEMENT_SIZE[dtype]
        )
    )
    return {"comm": comm, "flags": flags, "lamport": lamport, "segment": segment}
