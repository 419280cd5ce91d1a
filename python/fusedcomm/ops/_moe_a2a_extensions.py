"""Checks of the MoE all-to-all frontends' round and API-extension arguments (ops/moe_a2a.py).

The engines' call forms carry arguments beyond the seed API (output dtypes and scales, a low
precision wire format, rank masks, EPLB statistics). What is implemented is checked here before
any launch; what is not raises ``NotImplementedError`` naming the argument, so nothing is
ignored. A combine must also repeat the dispatch it belongs to (the round of the workspace).
"""

from __future__ import annotations

from typing import Any

import torch

from ..enums import QuantizationSFLayout
from ._moe_a2a_state import MoeA2ACheckError, _tensor, _Workspace

COMBINE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SF_LAYOUT_LINEAR = QuantizationSFLayout.LINEAR  # SfLayout.layout_linear
SF_LAYOUTS = (0, 1, 2)  # SfLayout: layout_128x4, layout_8x4, layout_linear


def _eplb_stats(op: str, st: _Workspace, stats: Any) -> tuple[int, int]:
    """(address, entries) of the EPLB statistics a dispatch gathers; (0, 0) without."""
    if stats is None:
        return 0, 0
    stats = _tensor(op, "eplb_local_stats", stats)
    reserved = st.layout.eplb_stats_num_experts
    if reserved == 0:
        raise ValueError(
            f"{op}: eplb_local_stats needs a workspace initialised with eplb_stats_num_experts > 0"
        )
    if stats.dtype != torch.int32:
        raise TypeError(f"{op}: eplb_local_stats.dtype ({stats.dtype}) must be int32")
    if stats.dim() != 1 or not 1 <= stats.numel() <= reserved or not stats.is_contiguous():
        raise ValueError(
            f"{op}: eplb_local_stats ({tuple(stats.shape)}) must be a contiguous 1-D tensor of 1 "
            f"to eplb_stats_num_experts ({reserved}) entries"
        )
    if stats.device != st.workspace.device:
        raise ValueError(
            f"{op}: eplb_local_stats is on {stats.device}, the workspace on {st.workspace.device}"
        )
    return stats.data_ptr(), stats.numel()


def _unsupported_extensions(op: str, st: _Workspace, mask: Any) -> None:
    """Arguments of the API that this implementation does not provide: refused, never ignored."""
    if mask is None:
        return
    full = (1 << st.world) - 1
    try:
        bits = int(mask.item()) if isinstance(mask, torch.Tensor) else int(mask)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{op}: active_rank_mask must be an integer or a one-element tensor"
        ) from None
    if bits & full != full:
        raise NotImplementedError(
            f"{op}: active_rank_mask {bits:#x} excludes ranks; excluding ranks from a round is not "
            f"implemented (a mask with all {st.world} ranks' bits, {full:#x}, is accepted)"
        )


def _same_round(op: str, st: _Workspace, local: Any, top_k: Any, r: Any, offset: Any, owner: Any):
    """The combine repeats the last dispatch on this workspace (checked before any launch)."""
    last = st.round
    if last is None:
        raise MoeA2ACheckError(
            f"{op}: no dispatch on this workspace since the last combine (or initialisation); "
            "a round is one dispatch, then one combine"
        )
    if last.owner is not owner:
        raise MoeA2ACheckError(
            f"{op}: the last dispatch on this workspace belongs to "
            f"{'another MoeAlltoAll' if last.owner is not None else 'moe_a2a_dispatch'}; "
            "interleaved rounds on one workspace corrupt both"
        )
    got = (local, top_k, r, offset)
    want = (last.local_tokens, last.top_k, last.max_tokens, last.combine_offset)
    if got != want:
        names = (
            "local_num_tokens",
            "top_k",
            "runtime_max_tokens_per_rank",
            "combine_payload_offset",
        )
        diff = ", ".join(f"{n} {g} (dispatch: {w})" for n, g, w in zip(names, got, want) if g != w)
        raise MoeA2ACheckError(f"{op}: the combine must repeat its dispatch's arguments: {diff}")


def _combine_output_dtype(
    op: str, payload: Any, output_dtype: Any, scales: Any, scalar: Any, layout: Any, low: Any
) -> torch.dtype | None:
    """The output dtype of a combine; the extensions this implementation lacks are refused."""
    if low:
        raise NotImplementedError(
            f"{op}: use_low_precision=True (a lower-precision combine wire format) is not "
            "implemented; pass use_low_precision=False"
        )
    if scales is not None:
        raise NotImplementedError(
            f"{op}: output_scales (quantised combine outputs) is not implemented"
        )
    try:
        scalar_is_one = float(scalar) == 1.0
    except (TypeError, ValueError):
        raise TypeError(f"{op}: output_scalar_scale must be a float, got {scalar!r}") from None
    if not scalar_is_one:
        raise NotImplementedError(
            f"{op}: output_scalar_scale ({scalar}) is the global scale of NVFP4 outputs, which are "
            "not implemented; pass 1.0"
        )
    if isinstance(layout, bool) or not isinstance(layout, int) or int(layout) not in SF_LAYOUTS:
        raise ValueError(f"{op}: sf_layout ({layout!r}) must be an SfLayout value {SF_LAYOUTS}")
    if output_dtype is None:
        return getattr(payload, "dtype", None)
    if not isinstance(output_dtype, torch.dtype):
        raise TypeError(f"{op}: output_dtype must be a torch.dtype, got {output_dtype!r}")
    if output_dtype not in COMBINE_DTYPES:
        raise NotImplementedError(
            f"{op}: output_dtype {output_dtype} (a quantised combine output) is not implemented; "
            "float16, bfloat16 and float32 are"
        )
    return output_dtype
