"""The boundary between the fused all-reduce frontends and their kernels.

The frontends (``ops/allreduce_fusion.py``, ``ops/moe_fusion.py``) validate the user's
arguments and normalise them into a :class:`FusionCall` (or a ``MoeFusionCall``); planning,
the per-configuration kernel modules and the launch live here, the control module and each
workspace's control block in ``runtime/fusion_control.py`` (``jit/allreduce_fusion.py``: a
host-only control module and one kernel module per dtype and world size).
"""

from __future__ import annotations

import dataclasses

import torch

from .._checks import ELEMENT_SIZE
from ..jit import allreduce_fusion as specs
from ..jit import load
from ..jit.configs import dtype_key, world_key
from ..runtime.fusion_control import (  # noqa: F401  (re-exported: the family's one entry)
    ControlBlock,
    _block_for,
    _control,
    _describe,
    attach_table,
    new_control_block,
    workspace_bytes,
)


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


# Bytes of one token row the kernels take: 65536 16-bit or 32768 fp32 elements.
MAX_ROW_BYTES = 131072

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
            token_num,
            hidden_dim,
            ELEMENT_SIZE[dtype],
            world_size,
            segment_bytes,
            _algorithm(use_oneshot),
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
