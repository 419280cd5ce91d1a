"""Codes of the TRT-LLM-style all-reduce family, as plain classes of int attributes.

User code passes and compares raw ints (``pattern=AllReduceFusionPattern.kARResidualRMSNorm``
is just ``1``), so these are deliberately not ``enum.Enum`` members. The numeric constants
below are the limits users can observe; kernels read the same values from their own headers.
"""

from __future__ import annotations

__all__ = [
    "AllReduceFusionOp",
    "AllReduceFusionPattern",
    "AllReduceStrategyConfig",
    "AllReduceStrategyType",
    "BarrierFlagCount",
    "DYNAMIC_FP8_MIN_SCALE",
    "FP8_E4M3_MAX",
    "LamportTokenNumThreshold",
    "MAX_ALL_REDUCE_BLOCKS",
    "MAX_COMM_SIZE",
    "MNNVL_ONE_SHOT_THRESHOLD",
    "OneShotMaxToken",
    "QuantizationSFLayout",
    "pattern_name",
]


class AllReduceStrategyType:
    """Algorithm of the legacy ``trtllm_custom_all_reduce``.

    ONESHOT and MIN_LATENCY run the Lamport one-shot (16-bit calls that fit a Lamport buffer;
    others two-shot), TWOSHOT the two-shot, AUTO the planner's choice, NCCL
    ``torch.distributed.all_reduce`` over the workspace's group; UB and LOWPRECISION raise
    NotImplementedError (docs/legacy-allreduce.md).
    """

    NCCL = 0
    MIN_LATENCY = 1
    UB = 2
    AUTO = 3
    ONESHOT = 4
    TWOSHOT = 5
    LOWPRECISION = 6


class AllReduceStrategyConfig:
    """Bit flags of the legacy all-reduce."""

    USE_MEMCPY = 1 << 0  # stage the input with an async copy instead of inside the kernel
    PUSH_MODE = 1 << 1  # writers push into peers' buffers; incompatible with USE_MEMCPY


class AllReduceFusionOp:
    """Epilogue of the legacy ``trtllm_custom_all_reduce``: NONE, RESIDUAL_RMS_NORM and
    RESIDUAL_RMS_PREPOST_NORM run; the others raise NotImplementedError (they are patterns of
    ``allreduce_fusion``)."""

    NONE = 0
    RESIDUAL_RMS_NORM = 1
    LAST_PROCESS_FOR_UB = 2
    RESIDUAL_RMS_PREPOST_NORM = 3
    RESIDUAL_RMS_NORM_QUANT_FP8 = 4
    RESIDUAL_RMS_NORM_QUANT_NVFP4 = 5
    RESIDUAL_RMS_NORM_OUT_QUANT_FP8 = 6
    RESIDUAL_RMS_NORM_OUT_QUANT_NVFP4 = 7
    MOE_ALLREDUCE_RESIDUAL_RMS_NORM = 8
    MOE_FINALIZE_ALLREDUCE_RESIDUAL_RMS_NORM = 9


class AllReduceFusionPattern:
    """What ``allreduce_fusion`` / ``trtllm_allreduce_fusion`` compute after the sum.

    "AR" = all-reduce, "Residual" = add ``residual_in`` (written to ``residual_out``),
    "RMSNorm" = RMS normalisation; "Out" = the normalised rows are written too (``norm_out``)
    besides their quantised form.
    """

    kAllReduce = 0
    kARResidualRMSNorm = 1
    kARResidualRMSNormFP8Quant = 2
    kARResidualRMSNormFP4Quant = 3
    kARResidualRMSNormOutFP8Quant = 4
    kARResidualRMSNormOutFP4Quant = 5
    kMoEReductionARResidualRMSNorm = 6
    kMoEFinalizeARResidualRMSNorm = 7
    kARResidualRMSNormPerTokenGroupFP8PackedQuant = 8
    kARResidualRMSNormOutPerTokenGroupFP8PackedQuant = 9
    kARResidualRMSNormDynamicFP8Quant = 10
    kARResidualRMSNormOutDynamicFP8Quant = 11
    kMoEFinalizeARResidualRMSNormFP8Quant = 12


class QuantizationSFLayout:
    """Layout of NVFP4 scale factors in ``scale_out``."""

    SWIZZLED_128x4 = 0  # 128-row x 4-column tiles of 512 bytes (the default)
    SWIZZLED_8x4 = 1  # 8-row x 4-column tiles of 32 bytes
    LINEAR = 2  # row-major [rows, hidden_dim / 16]


_PATTERN_NAMES = {
    value: name for name, value in vars(AllReduceFusionPattern).items() if name.startswith("k")
}


def pattern_name(pattern: int) -> str:
    """``"kARResidualRMSNorm (1)"`` for 1; used in error messages."""
    name = _PATTERN_NAMES.get(pattern)
    return f"{name} ({pattern})" if name else f"pattern {pattern}"


# Flags per rank per peer in the fusion workspace's barrier buffer.
BarrierFlagCount = 256
# Cap on one Lamport segment of the fusion workspace, in bytes (INT32_MAX rounded down to 2 MiB).
MAX_COMM_SIZE = 2147483647 & ~((1 << 21) - 1)
# Exported for compatibility only: nothing here reads it. The MoE fusions run one-shot at any
# token count whose rows fit one Lamport segment, without a warning, and refuse larger calls.
OneShotMaxToken = 128
# Sizing of the legacy (non-fusion) workspace.
MAX_ALL_REDUCE_BLOCKS = 24
LamportTokenNumThreshold = 16
# The multi-node NVLink all-reduce runs one-shot up to this many bytes (tokens x hidden x ranks).
MNNVL_ONE_SHOT_THRESHOLD = 64 * 1024 * 8 * 2
# Largest finite FP8 E4M3 magnitude, and the smallest dynamic per-token FP8 scale.
FP8_E4M3_MAX = 448.0
DYNAMIC_FP8_MIN_SCALE = 2.0**-9 / 448.0
