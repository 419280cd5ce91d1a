"""The legacy TRT-LLM custom all-reduce entry point (deprecated; kept because the API lists it).

Every argument is checked as the legacy kernel would; the call then points to the modern API,
which runs the same numerics on the Lamport fusion kernels.
"""

from __future__ import annotations

import torch

from ..enums import AllReduceFusionOp, AllReduceStrategyConfig, AllReduceStrategyType
from .allreduce_fusion import _ELEM, _deprecated_once, _flag, _int

__all__ = ["trtllm_custom_all_reduce"]


_LEGACY_WORLD_SIZES = (2, 4, 6, 8, 16)
_LEGACY_OPS = (
    AllReduceFusionOp.NONE,
    AllReduceFusionOp.RESIDUAL_RMS_NORM,
    AllReduceFusionOp.RESIDUAL_RMS_PREPOST_NORM,
)


def trtllm_custom_all_reduce(
    inp,
    out,
    tp_size,
    tp_rank,
    token_num,
    fusion_op_code,
    strategy_code,
    config_code,
    launch_with_pdl,
    flag_value,
    peer_comm_buffer_ptrs,
    peer_barrier_ptrs_in,
    peer_barrier_ptrs_out,
    bias,
    residual,
    weight,
    weight_pre_residual_norm,
    eps,
    intermediate_buffer,
    lamport_peer_comm_buffer_ptrs_0,
    lamport_peer_comm_buffer_ptrs_1,
    lamport_peer_comm_buffer_ptrs_2,
) -> None:
    """The legacy all-reduce (deprecated): ``out = sum over ranks of inp``, optionally fused
    with bias + residual + RMSNorm. Arguments are checked; the kernel itself is not provided:
    the call then raises NotImplementedError pointing to allreduce_fusion."""
    op = "trtllm_custom_all_reduce"
    _deprecated_once(op, "allreduce_fusion")
    for name, value in (("inp", inp), ("out", out)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")
    elem = _ELEM.get(inp.dtype)
    if elem is None:
        raise TypeError(f"{op}: dtype ({inp.dtype}) must be float16, bfloat16 or float32")
    if out.dtype != inp.dtype or out.numel() != inp.numel():
        raise ValueError(
            f"{op}: out ({out.dtype}, {out.numel()} elements) must match inp "
            f"({inp.dtype}, {inp.numel()})"
        )
    _int(op, "tp_size", tp_size, 1)
    if tp_size not in _LEGACY_WORLD_SIZES:
        raise ValueError(f"{op}: tp_size ({tp_size}) must be one of {_LEGACY_WORLD_SIZES}")
    _int(op, "tp_rank", tp_rank, 0)
    if tp_rank >= tp_size:
        raise ValueError(f"{op}: tp_rank ({tp_rank}) must be < tp_size ({tp_size})")
    _int(op, "token_num", token_num, 1)
    if inp.numel() % token_num:
        raise ValueError(
            f"{op}: inp.numel() ({inp.numel()}) must be a multiple of token_num ({token_num})"
        )
    _int(op, "fusion_op_code", fusion_op_code, 0)
    if fusion_op_code not in _LEGACY_OPS:
        raise NotImplementedError(
            f"{op}: fusion_op_code ({fusion_op_code}) is not supported "
            f"(NONE, RESIDUAL_RMS_NORM, RESIDUAL_RMS_PREPOST_NORM)"
        )
    strategies = (AllReduceStrategyType.ONESHOT, AllReduceStrategyType.TWOSHOT)
    if strategy_code not in strategies:
        raise ValueError(
            f"{op}: strategy_code ({strategy_code!r}) must be ONESHOT (4) or TWOSHOT (5)"
        )
    both = AllReduceStrategyConfig.USE_MEMCPY | AllReduceStrategyConfig.PUSH_MODE
    _int(op, "config_code", config_code, 0)
    if config_code & ~both or config_code == both:
        raise ValueError(
            f"{op}: config_code ({config_code}) must combine USE_MEMCPY or PUSH_MODE, not both"
        )
    vec = 16 // elem * (tp_size if strategy_code == AllReduceStrategyType.TWOSHOT else 1)
    if inp.numel() % vec:
        raise ValueError(
            f"{op}: inp.numel() ({inp.numel()}) must be a multiple of {vec} for "
            "this strategy and dtype"
        )
    _flag(op, "launch_with_pdl", launch_with_pdl)
    _int(op, "flag_value", flag_value, 1)
    for name, ptrs in (
        ("peer_comm_buffer_ptrs", peer_comm_buffer_ptrs),
        ("peer_barrier_ptrs_in", peer_barrier_ptrs_in),
        ("peer_barrier_ptrs_out", peer_barrier_ptrs_out),
        ("lamport_peer_comm_buffer_ptrs_0", lamport_peer_comm_buffer_ptrs_0),
        ("lamport_peer_comm_buffer_ptrs_1", lamport_peer_comm_buffer_ptrs_1),
        ("lamport_peer_comm_buffer_ptrs_2", lamport_peer_comm_buffer_ptrs_2),
    ):
        if (
            not isinstance(ptrs, torch.Tensor)
            or ptrs.device.type != "cpu"
            or ptrs.dtype != torch.int64
            or ptrs.numel() != tp_size
        ):
            raise ValueError(
                f"{op}: {name} must be a CPU int64 tensor of tp_size ({tp_size}) pointers"
            )
    if fusion_op_code != AllReduceFusionOp.NONE:
        for name, value in (("residual", residual), ("intermediate_buffer", intermediate_buffer)):
            if not isinstance(value, torch.Tensor) or value.numel() != inp.numel():
                raise ValueError(
                    f"{op}: {name} must be a tensor of {inp.numel()} elements for "
                    f"fusion_op_code {fusion_op_code}"
                )
    raise NotImplementedError(
        f"{op}: the legacy kernel is not provided; use allreduce_fusion with a workspace from "
        "create_allreduce_fusion_workspace (kAllReduce or kARResidualRMSNorm)"
    )
