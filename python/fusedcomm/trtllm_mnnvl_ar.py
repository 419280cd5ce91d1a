"""The MNNVL all-reduce names under the sub-module path engines import them from
(``<package>.trtllm_mnnvl_ar``): the same objects as at the top level.

fusedcomm's MNNVL workspace lives on one node and uses no NVLink multicast: the Lamport fusion
kernels run over rows of peer-mapped memory (see ``runtime/mnnvl_workspace.py`` and
docs/mnnvl-allreduce.md)."""

from .enums import MNNVL_ONE_SHOT_THRESHOLD
from .ops.mnnvl_allreduce import (
    get_allreduce_mnnvl_workspace,
    trtllm_mnnvl_all_reduce,
    trtllm_mnnvl_allreduce,
    trtllm_mnnvl_fused_allreduce_add_rmsnorm,
    trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant,
    trtllm_mnnvl_fused_allreduce_rmsnorm,
)
from .runtime.comm_backend import mpi_barrier
from .runtime.mnnvl_workspace import (
    MNNVLAllreduceFusionStrategy,
    MNNVLAllReduceFusionWorkspace,
    MNNVLQuantType,
)

__all__ = [
    "MNNVL_ONE_SHOT_THRESHOLD",
    "MNNVLAllReduceFusionWorkspace",
    "MNNVLAllreduceFusionStrategy",
    "MNNVLQuantType",
    "get_allreduce_mnnvl_workspace",
    "mpi_barrier",
    "trtllm_mnnvl_all_reduce",
    "trtllm_mnnvl_allreduce",
    "trtllm_mnnvl_fused_allreduce_add_rmsnorm",
    "trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant",
    "trtllm_mnnvl_fused_allreduce_rmsnorm",
]
