"""fusedcomm: fused GPU communication kernels for LLM inference engines.

Code written against ``flashinfer.comm`` runs with ``import fusedcomm as comm``. Kernels are
built per GPU architecture on first use (or loaded from the prebuilt-kernel package), loaded
through TVM-FFI and registered as torch custom ops.
"""

from ._version import __version__ as __version__
from .dlpack_utils import pack_strided_memory
from .enums import (
    MAX_COMM_SIZE,
    AllReduceFusionOp,
    AllReduceFusionPattern,
    AllReduceStrategyConfig,
    AllReduceStrategyType,
    BarrierFlagCount,
    OneShotMaxToken,
    QuantizationSFLayout,
)
from .jit import BuildError, MissingModuleError
from .mapping import Mapping
from .ops.allreduce_fusion import allreduce_fusion, trtllm_allreduce_fusion
from .ops.allreduce_legacy import trtllm_custom_all_reduce
from .ops.dcp_a2a import decode_cp_a2a_alltoall, decode_cp_a2a_init_workspace
from .ops.lamport import trtllm_lamport_initialize, trtllm_lamport_initialize_all
from .ops.mnnvl_allreduce import (
    get_allreduce_mnnvl_workspace,
    trtllm_mnnvl_all_reduce,
    trtllm_mnnvl_allreduce,
    trtllm_mnnvl_fused_allreduce_add_rmsnorm,
    trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant,
    trtllm_mnnvl_fused_allreduce_rmsnorm,
)
from .ops.moe_a2a import (
    moe_a2a_active_rank_mask,
    moe_a2a_combine,
    moe_a2a_dispatch,
    moe_a2a_dropped_expert_ids,
    moe_a2a_initialize,
    moe_a2a_sanitize_expert_ids,
)
from .ops.moe_alltoall import MoeA2AArgumentError, MoeA2AStateError, MoeAlltoAll
from .ops.moe_fusion import trtllm_moe_allreduce_fusion, trtllm_moe_finalize_allreduce_fusion
from .ops.vllm_ar import (
    vllm_all_reduce,
    vllm_dispose,
    vllm_get_graph_buffer_ipc_meta,
    vllm_init_custom_ar,
    vllm_meta_size,
    vllm_register_buffer,
    vllm_register_graph_buffers,
)
from .reference.quant import compute_fp4_swizzled_layout_sf_size
from .runtime.comm_backend import (
    CommBackend,
    MnnvlConfig,
    MPIBackend,
    SoloBackend,
    TorchDistBackend,
    mpi_barrier,
)
from .runtime.cuda_ipc import (
    CudaRTLibrary,
    CudaUnavailableError,
    create_shared_buffer,
    free_shared_buffer,
)
from .runtime.dcp_a2a_workspace import (
    decode_cp_a2a_allocate_mnnvl_workspace,
    decode_cp_a2a_workspace_size,
)
from .runtime.failures import (
    CommFailureError,
    PeerAbortedError,
    PeerTimeoutError,
    ProtocolMismatchError,
    check_errors,
)
from .runtime.fusion_workspace import (
    AllReduceFusionWorkspace,
    TRTLLMAllReduceFusionWorkspace,
    create_allreduce_fusion_workspace,
    fusion_workspace_bytes,
    trtllm_create_ipc_workspace_for_all_reduce_fusion,
    trtllm_destroy_ipc_workspace_for_all_reduce,
    trtllm_destroy_ipc_workspace_for_all_reduce_fusion,
)
from .runtime.legacy_workspace import trtllm_create_ipc_workspace_for_all_reduce
from .runtime.mnnvl_workspace import (
    MNNVLAllreduceFusionStrategy,
    MNNVLAllReduceFusionWorkspace,
    MNNVLQuantType,
)
from .runtime.moe_a2a_workspace import (
    moe_a2a_get_workspace_size_per_rank,
    moe_a2a_wrap_payload_tensor_in_workspace,
)
from .warmup import warmup

__all__ = [
    "AllReduceFusionOp",
    "AllReduceFusionPattern",
    "AllReduceFusionWorkspace",
    "AllReduceStrategyConfig",
    "AllReduceStrategyType",
    "BarrierFlagCount",
    "MAX_COMM_SIZE",
    "MNNVLAllReduceFusionWorkspace",
    "MNNVLAllreduceFusionStrategy",
    "MNNVLQuantType",
    "OneShotMaxToken",
    "QuantizationSFLayout",
    "TRTLLMAllReduceFusionWorkspace",
    "allreduce_fusion",
    "compute_fp4_swizzled_layout_sf_size",
    "create_allreduce_fusion_workspace",
    "fusion_workspace_bytes",
    "get_allreduce_mnnvl_workspace",
    "trtllm_allreduce_fusion",
    "trtllm_create_ipc_workspace_for_all_reduce",
    "trtllm_create_ipc_workspace_for_all_reduce_fusion",
    "trtllm_custom_all_reduce",
    "trtllm_destroy_ipc_workspace_for_all_reduce",
    "trtllm_destroy_ipc_workspace_for_all_reduce_fusion",
    "trtllm_mnnvl_all_reduce",
    "trtllm_mnnvl_allreduce",
    "trtllm_mnnvl_fused_allreduce_add_rmsnorm",
    "trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant",
    "trtllm_mnnvl_fused_allreduce_rmsnorm",
    "trtllm_moe_allreduce_fusion",
    "trtllm_moe_finalize_allreduce_fusion",
    "BuildError",
    "CommBackend",
    "CudaRTLibrary",
    "CudaUnavailableError",
    "MPIBackend",
    "Mapping",
    "MissingModuleError",
    "MnnvlConfig",
    "CommFailureError",
    "PeerAbortedError",
    "PeerTimeoutError",
    "ProtocolMismatchError",
    "SoloBackend",
    "TorchDistBackend",
    "check_errors",
    "create_shared_buffer",
    "decode_cp_a2a_allocate_mnnvl_workspace",
    "decode_cp_a2a_alltoall",
    "decode_cp_a2a_init_workspace",
    "decode_cp_a2a_workspace_size",
    "free_shared_buffer",
    "MoeA2AArgumentError",
    "MoeA2AStateError",
    "MoeAlltoAll",
    "moe_a2a_combine",
    "moe_a2a_dispatch",
    "moe_a2a_dropped_expert_ids",
    "moe_a2a_get_workspace_size_per_rank",
    "moe_a2a_initialize",
    "moe_a2a_active_rank_mask",
    "moe_a2a_sanitize_expert_ids",
    "moe_a2a_wrap_payload_tensor_in_workspace",
    "mpi_barrier",
    "pack_strided_memory",
    "trtllm_lamport_initialize",
    "trtllm_lamport_initialize_all",
    "vllm_all_reduce",
    "vllm_dispose",
    "vllm_get_graph_buffer_ipc_meta",
    "vllm_init_custom_ar",
    "vllm_meta_size",
    "vllm_register_buffer",
    "vllm_register_graph_buffers",
    "warmup",
]
