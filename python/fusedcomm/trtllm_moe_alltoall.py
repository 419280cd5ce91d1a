"""The MoE all-to-all names under the sub-module path some engines import them from
(``<package>.trtllm_moe_alltoall``); the same objects as at the top level."""

from .ops.moe_a2a import (
    moe_a2a_active_rank_mask,
    moe_a2a_combine,
    moe_a2a_dispatch,
    moe_a2a_dropped_expert_ids,
    moe_a2a_initialize,
    moe_a2a_sanitize_expert_ids,
)
from .ops.moe_alltoall import MoeAlltoAll
from .runtime.moe_a2a_workspace import (
    moe_a2a_get_workspace_size_per_rank,
    moe_a2a_wrap_payload_tensor_in_workspace,
)

__all__ = [
    "MoeAlltoAll",
    "moe_a2a_active_rank_mask",
    "moe_a2a_combine",
    "moe_a2a_dispatch",
    "moe_a2a_dropped_expert_ids",
    "moe_a2a_get_workspace_size_per_rank",
    "moe_a2a_initialize",
    "moe_a2a_sanitize_expert_ids",
    "moe_a2a_wrap_payload_tensor_in_workspace",
]
