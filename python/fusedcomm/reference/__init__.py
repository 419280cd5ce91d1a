"""Plain-torch references for fusedcomm's collectives, shared by the tests and by users.

Each reference computes on whatever device its inputs live on (CPU included), takes every
rank's tensor explicitly (no process group needed) and fixes the order of every floating-point
operation, so a kernel that promises the same order can be compared with ``torch.equal``.

- :func:`all_reduce`: fp32 sum in ascending rank order, one final rounding.
- :mod:`.fusion`: residual add, RMSNorm and the FP8 quantisers of the fused patterns.
- :mod:`.legacy`: the legacy ``trtllm_custom_all_reduce`` (sum and its three epilogues).
- :mod:`.quant`: NVFP4, E2M1, the scale-factor layouts, UE8M0 and per-token-group FP8.
- :mod:`.moe`: the MoE prologues (reduction, finalize) and the MoE fusions built on them.
- :mod:`.moe_a2a`: the MoE all-to-all (expert owners, dispatch, combine, sanitize), all ranks
  at once.
- :mod:`.dcp_a2a`: the decode context-parallel all-to-all (a transpose across ranks), all ranks
  at once.
- :mod:`.mixed_comm`: the mixed collectives (AR, AG, RS, AR+AG, RS+AR), all ranks at once.
"""

from .allreduce import all_reduce
from .dcp_a2a import dcp_alltoall_reference
from .fusion import (
    allreduce_fusion_reference,
    fp8_e4m3,
    fusion_all_reduce,
    quantize_fp8_dynamic,
    quantize_fp8_static,
    residual_rms_norm,
)
from .legacy import custom_all_reduce_reference, legacy_epilogue
from .mixed_comm import mixed_comm_reference
from .moe import moe_allreduce_fusion_reference, moe_finalize, moe_reduction
from .moe_a2a import (
    COMBINE_PAIRWISE_TOP_K,
    DispatchReference,
    combine_reference,
    combine_sum,
    combine_sum_steps,
    dispatch_reference,
    expert_owner,
    received_rows,
    sanitize_reference,
)
from .quant import (
    compute_fp4_swizzled_layout_sf_size,
    dequantize_fp8_per_token_group,
    dequantize_nvfp4,
    e2m1_decode,
    e2m1_encode,
    pack_e2m1,
    pack_ue8m0_scales,
    quantize_fp8_per_token_group,
    quantize_nvfp4,
    read_scale_factors,
    round_scale_up_to_pow2,
    scale_factor_buffer_size,
    scale_factor_offsets,
    ue8m0_decode,
    ue8m0_encode,
    unpack_e2m1,
    unpack_ue8m0_scales,
    write_scale_factors,
)

__all__ = [
    "COMBINE_PAIRWISE_TOP_K",
    "DispatchReference",
    "all_reduce",
    "allreduce_fusion_reference",
    "combine_reference",
    "combine_sum",
    "combine_sum_steps",
    "compute_fp4_swizzled_layout_sf_size",
    "custom_all_reduce_reference",
    "dcp_alltoall_reference",
    "dequantize_fp8_per_token_group",
    "dequantize_nvfp4",
    "dispatch_reference",
    "e2m1_decode",
    "e2m1_encode",
    "expert_owner",
    "fp8_e4m3",
    "fusion_all_reduce",
    "legacy_epilogue",
    "mixed_comm_reference",
    "moe_allreduce_fusion_reference",
    "moe_finalize",
    "moe_reduction",
    "pack_e2m1",
    "pack_ue8m0_scales",
    "quantize_fp8_dynamic",
    "quantize_fp8_per_token_group",
    "quantize_fp8_static",
    "quantize_nvfp4",
    "read_scale_factors",
    "received_rows",
    "residual_rms_norm",
    "round_scale_up_to_pow2",
    "sanitize_reference",
    "scale_factor_buffer_size",
    "scale_factor_offsets",
    "ue8m0_decode",
    "ue8m0_encode",
    "unpack_e2m1",
    "unpack_ue8m0_scales",
    "write_scale_factors",
]
