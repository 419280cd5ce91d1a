"""The decode context-parallel all-to-all names under the sub-module path engines import them
from (``<package>.dcp_alltoall``); the same objects as at the top level."""

from .ops.dcp_a2a import decode_cp_a2a_alltoall, decode_cp_a2a_init_workspace
from .runtime.dcp_a2a_workspace import (
    decode_cp_a2a_allocate_mnnvl_workspace,
    decode_cp_a2a_workspace_size,
)

__all__ = [
    "decode_cp_a2a_allocate_mnnvl_workspace",
    "decode_cp_a2a_alltoall",
    "decode_cp_a2a_init_workspace",
    "decode_cp_a2a_workspace_size",
]
