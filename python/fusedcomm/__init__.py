"""fusedcomm: fused GPU communication kernels for LLM inference engines.

Code written against ``flashinfer.comm`` runs with ``import fusedcomm as comm``. Kernels are
built per GPU architecture on first use (or loaded from the prebuilt-kernel package), loaded
through TVM-FFI and registered as torch custom ops.
"""

from ._version import __version__

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
from .dlpack_utils import pack_strided_memory
from .mapping import Mapping
from .ops.lamport import trtllm_lamport_initialize, trtllm_lamport_initialize_all
from .ops.vllm_ar import (
    vllm_all_reduce,
    vllm_dispose,
    vllm_get_graph_buffer_ipc_meta,
    vllm_init_custom_ar,
    vllm_meta_size,
    vllm_register_buffer,
    vllm_register_graph_buffers,
)
from .jit import BuildError, MissingModuleError
from .runtime.failures import PeerTimeoutError, check_errors
from .warmup import warmup

__all__ = [
    "BuildError",
    "CommBackend",
    "CudaRTLibrary",
    "CudaUnavailableError",
    "MPIBackend",
    "Mapping",
    "MissingModuleError",
    "MnnvlConfig",
    "PeerTimeoutError",
    "SoloBackend",
    "TorchDistBackend",
    "check_errors",
    "create_shared_buffer",
    "free_shared_buffer",
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
