"""The TensorRT-LLM-style all-reduce names under the sub-module path some engines import them
from (``<package>.trtllm_ar``): enums, ops, workspaces and utilities, the same objects as at the
top level."""

from . import (
    MAX_COMM_SIZE,
    AllReduceFusionOp,
    AllReduceFusionPattern,
    AllReduceStrategyConfig,
    AllReduceStrategyType,
    BarrierFlagCount,
    OneShotMaxToken,
    QuantizationSFLayout,
    compute_fp4_swizzled_layout_sf_size,
    trtllm_allreduce_fusion,
    trtllm_create_ipc_workspace_for_all_reduce,
    trtllm_create_ipc_workspace_for_all_reduce_fusion,
    trtllm_custom_all_reduce,
    trtllm_destroy_ipc_workspace_for_all_reduce,
    trtllm_destroy_ipc_workspace_for_all_reduce_fusion,
    trtllm_lamport_initialize,
    trtllm_lamport_initialize_all,
    trtllm_moe_allreduce_fusion,
    trtllm_moe_finalize_allreduce_fusion,
)
from .enums import MAX_ALL_REDUCE_BLOCKS, LamportTokenNumThreshold  # the legacy sizing constants

__all__ = [
    "MAX_COMM_SIZE",
    "AllReduceFusionOp",
    "AllReduceFusionPattern",
    "AllReduceStrategyConfig",
    "AllReduceStrategyType",
    "BarrierFlagCount",
    "LamportTokenNumThreshold",
    "MAX_ALL_REDUCE_BLOCKS",
    "OneShotMaxToken",
    "QuantizationSFLayout",
    "compute_fp4_swizzled_layout_sf_size",
    "trtllm_allreduce_fusion",
    "trtllm_create_ipc_workspace_for_all_reduce",
    "trtllm_create_ipc_workspace_for_all_reduce_fusion",
    "trtllm_custom_all_reduce",
    "trtllm_destroy_ipc_workspace_for_all_reduce",
    "trtllm_destroy_ipc_workspace_for_all_reduce_fusion",
    "trtllm_lamport_initialize",
    "trtllm_lamport_initialize_all",
    "trtllm_moe_allreduce_fusion",
    "trtllm_moe_finalize_allreduce_fusion",
]
