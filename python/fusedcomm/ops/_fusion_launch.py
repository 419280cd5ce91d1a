"""The boundary between the fused all-reduce frontends and their kernels.

The frontends (``ops/allreduce_fusion.py``, ``runtime/fusion_workspace.py``) validate the user's
arguments and normalise them into a :class:`FusionCall`; everything below this line (planning,
per-configuration modules, the launch) lives here and in the compiled modules
(``jit/allreduce_fusion.py``: a host-only control module and one kernel module per dtype and
world size).

How ``launch`` finds a workspace's :class:`ControlBlock` without synchronising: every control
block is registered by its device address (the last entry of the pointer table). The frontend
binds the pointer table it builds to the block with :meth:`ControlBlock.attach` (or
:func:`attach_table`); a call then finds the block by the table's ``data_ptr`` (checked by
identity through a weak reference, so a new tensor at a recycled address is never confused
with the old one). A table that was never attached (e.g. a copy the caller made) is bound on
its first call by reading its last entry once, which synchronises; that is refused while a
CUDA graph is being captured.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch

from .. import envs
from ..jit import allreduce_fusion as specs
from ..jit import load
from ..jit.configs import dtype_key, world_key
from ..runtime.failures import FailureState, FamilyNames


@dataclasses.dataclass(frozen=True)
class FusionCall:
    """One validated call of the Lamport all-reduce family.

    Tensors are contiguous CUDA tensors on the input's device (or None where the pattern does
    not use them); ``input`` and every output are viewed as ``[token_num, hidden_dim]`` rows.
    ``scale_factor`` is a 1-element float32 CUDA tensor (read on the device) or None.
    ``use_oneshot`` is the caller's choice (None: the planner decides).
    """

    pattern: int
    input: torch.Tensor
    token_num: int
    hidden_dim: int
    world_size: int
    rank: int
    workspace_ptrs: torch.Tensor
    launch_with_pdl: bool = False
    trigger_completion_at_end: bool = True
    fp32_acc: bool = False
    use_oneshot: bool | None = None
    allreduce_out: torch.Tensor | None = None
    residual_in: torch.Tensor | None = None
    residual_out: torch.Tensor | None = None
    norm_out: torch.Tensor | None = None
    quant_out: torch.Tensor | None = None
    scale_out: torch.Tensor | None = None
    rms_gamma: torch.Tensor | None = None
    rms_eps: float = 1e-6
    scale_factor: torch.Tensor | None = None
    layout_code: int = 0
    weight_bias: float = 0.0
    block_quant_group_size: int | None = None


@functools.cache
def _control():
    """The host-only control module (no GPU or architecture needed to load it)."""
    return load(specs.control_spec())


@functools.cache
def _describe() -> dict:
    return dict(_control().allreduce_fusion_describe())


_ELEM = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
_launchers: dict[tuple[torch.dtype, int], int] = {}


def _launcher(dtype: torch.dtype, world: int) -> int:
    """The launcher of the kernel module for (dtype, world), loaded (built) on first use."""
    key = (dtype, world)
    address = _launchers.get(key)
    if address is None:
        module = load(specs.kernel_spec(dtype_key(dtype, "allreduce_fusion"), world_key(world)))
        if int(module.allreduce_fusion_abi()) != int(_control().allreduce_fusion_abi()):
            raise RuntimeError(
                "allreduce_fusion: the kernel and control modules were built from "
                "different sources; clear the JIT cache or rebuild the prebuilt "
                "set"
            )
        address = _launchers[key] = int(module.allreduce_fusion_launcher())
    return address


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


def _algorithm(use_oneshot: bool | None) -> int:
    names = [str(a) for a in _describe()["algorithms"]]
    return names.index("auto" if use_oneshot is None else "oneshot" if use_oneshot else "twoshot")


def plan(
    token_num: int,
    hidden_dim: int,
    dtype: torch.dtype,
    world_size: int,
    segment_bytes: int,
    use_oneshot: bool | None = None,
) -> dict[str, int | str]:
    """The launch plan of one call (pure; the same on every rank): algorithm name, threads per
    block, packs per thread, blocks."""
    alg, threads, packs, blocks = (
        int(v)
        for v in _control().allreduce_fusion_plan(
            token_num, hidden_dim, _ELEM[dtype], world_size, segment_bytes, _algorithm(use_oneshot)
        )
    )
    return {
        "algorithm": str(_describe()["algorithms"][alg]),
        "threads": threads,
        "packs": packs,
        "blocks": blocks,
    }


def _storage_span(t: torch.Tensor | None) -> torch.Tensor | None:
    """A strided tensor (the packed UE8M0 scales: strides (1, M)) as the contiguous run of
    storage it spans, which the kernel addresses itself."""
    if t is None or t.is_contiguous():
        return t
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.as_strided((span,), (1,))


def launch(call: FusionCall) -> None:
    """Run one fused all-reduce on the current stream."""
    block = _block_for(call.workspace_ptrs)
    block.failure.check("allreduce_fusion")
    c = call
    _control().allreduce_fusion_launch(
        c.input,
        c.workspace_ptrs,
        c.pattern,
        c.token_num,
        c.hidden_dim,
        c.world_size,
        c.rank,
        block.ptr,
        block.segment_bytes,
        block.comm_bytes,
        block.failure.claim_ptr,
        block.failure.record_device_ptr,
        block.timeout_s,
        bool(c.launch_with_pdl),
        bool(c.trigger_completion_at_end),
        bool(c.fp32_acc),
        _algorithm(c.use_oneshot),
        c.allreduce_out,
        c.residual_in,
        c.residual_out,
        c.norm_out,
        c.quant_out,
        _storage_span(c.scale_out),
        c.rms_gamma,
        float(c.rms_eps),
        c.scale_factor,
        int(c.layout_code),
        0 if c.block_quant_group_size is None else int(c.block_quant_group_size),
        float(c.weight_bias),
        _launcher(c.input.dtype, c.world_size),
    )


def launch_moe(call) -> None:
    """Run one MoE fusion (pattern 6 or 7; ``call`` is an ``ops.moe_fusion.MoeFusionCall``)
    on the current stream: the prologue's rows are all-reduced one-shot over the workspace."""
    block = _block_for(call.workspace_ptrs)
    block.failure.check("moe_allreduce_fusion")
    c = call
    _control().allreduce_fusion_moe_launch(
        c.pattern,
        c.workspace_ptrs,
        c.token_num,
        c.hidden_dim,
        c.world_size,
        c.rank,
        block.ptr,
        block.segment_bytes,
        block.failure.claim_ptr,
        block.failure.record_device_ptr,
        block.timeout_s,
        bool(c.launch_with_pdl),
        c.residual_in,
        c.rms_gamma,
        c.norm_out,
        float(c.rms_eps),
        float(c.weight_bias),
        c.residual_out,
        c.allreduce_out,
        c.quant_out,
        c.scale_out,
        float(c.scale_factor),
        int(c.layout_code),
        int(c.num_experts),
        c.scale_input,
        c.active_experts_token_input,
        c.token_input,
        c.allreduce_in,
        c.expanded_idx_to_permuted_idx,
        c.expert_scale_factor,
        c.shared_expert_output,
        float(c.routed_scaling_factor),
        int(c.top_k),
        _launcher(c.residual_in.dtype, c.world_size),
    )


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
    if dtype not in _ELEM:
        raise TypeError(
            f"fusion_workspace_bytes: dtype ({dtype}) must be float16, bfloat16 or float32"
        )
    comm, flags, lamport, segment = (
        int(v)
        for v in _control().allreduce_fusion_workspace_bytes(
            world_size, max_token_num, hidden_dim, _ELEM[dtype]
        )
    )
    return {"comm": comm, "flags": flags, "lamport": lamport, "segment": segment}
