"""Checks of the MoE all-to-all frontends' round and API-extension arguments (ops/moe_a2a.py).

The engines' call forms carry arguments beyond the seed API (output dtypes and scales, a low
precision wire format, rank masks, EPLB statistics). Each is checked here before any launch;
what is not implemented raises ``NotImplementedError`` naming the argument, so nothing is
ignored. A combine must also repeat the dispatch it belongs to (the round of the workspace).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..enums import QuantizationSFLayout
from ..reference.quant import scale_factor_buffer_size
from ._moe_a2a_state import MoeA2ACheckError, _tensor, _Workspace

COMBINE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SF_LAYOUT_LINEAR = QuantizationSFLayout.LINEAR  # SfLayout.layout_linear
SF_LAYOUTS = (0, 1, 2)  # SfLayout: layout_128x4, layout_8x4, layout_linear
MAX_QUANT_HIDDEN = 16384  # csrc/moe_a2a_quant.cu: 8 packs of 8 values per thread, 256 threads


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


def moe_a2a_active_rank_mask(active_ranks: Any, ep_size: int) -> torch.Tensor:
    """The ``active_rank_mask`` of a round in which ``active_ranks`` (a sequence or 1-D tensor
    of rank indices, each in ``[0, ep_size)``) take part: a CPU ``uint64 [1]`` tensor, bit ``q``
    set for each active rank ``q``."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or not 1 <= ep_size <= 64:
        raise ValueError(f"moe_a2a_active_rank_mask: ep_size ({ep_size!r}) must be in [1, 64]")
    bits = 0
    for q in active_ranks.tolist() if isinstance(active_ranks, torch.Tensor) else active_ranks:
        q = int(q)
        if not 0 <= q < ep_size:
            raise ValueError(f"moe_a2a_active_rank_mask: rank {q} is outside [0, {ep_size})")
        bits |= 1 << q
    return torch.tensor([bits], dtype=torch.uint64)


def _active_mask(op: str, st: _Workspace, mask: Any) -> int | None:
    """The ranks of a round from ``active_rank_mask`` (bit q: rank q takes part; bits of ranks
    outside the group are ignored): None for every rank, else the mask, which must hold this
    rank."""
    if mask is None:
        return None
    full = (1 << st.world) - 1
    try:
        if isinstance(mask, torch.Tensor):
            if mask.numel() != 1 or mask.dtype.is_floating_point or mask.dtype == torch.bool:
                raise TypeError
            bits = int(mask.reshape(-1)[0].item())
        elif isinstance(mask, bool) or not isinstance(mask, int):
            raise TypeError
        else:
            bits = int(mask)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{op}: active_rank_mask must be an integer or a one-element integer tensor "
            "(moe_a2a_active_rank_mask builds one)"
        ) from None
    bits &= full
    if not bits >> st.rank & 1:
        raise ValueError(
            f"{op}: active_rank_mask {bits:#x} must hold this rank (ep_rank {st.rank})"
        )
    return None if bits == full else bits


def _record(st: _Workspace, mask: int | None):
    """The launch entries' workspace record, with the round's active mask where it has one."""
    if mask is None:
        return st.record
    key = ("active_rank_mask", mask)
    record = st.plans.get(key)
    if record is None:
        from ._moe_a2a_state import _ffi_array

        base = [int(v) for v in st.record] if st.record is not None else []
        record = st.plans[key] = _ffi_array([*base, mask])
    return record


def _same_round(
    op: str, st: _Workspace, local: Any, top_k: Any, r: Any, offset: Any, owner: Any, mask=None
):
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
    if mask != last.mask:
        raise MoeA2ACheckError(
            f"{op}: active_rank_mask ({_mask_name(mask)}) must be the dispatch's "
            f"({_mask_name(last.mask)})"
        )


def _mask_name(mask: int | None) -> str:
    return "every rank" if mask is None else f"{mask:#x}"


# Quantised combine outputs, by (output_dtype, output_scales.dtype) as the reference library
# tells them apart: (kernel mode, values per scale, output bytes per value, name).
QUANT_OUTPUTS = {
    (torch.uint8, torch.float8_e4m3fn): (0, 16, 0.5, "NVFP4"),
    (torch.float8_e4m3fn, torch.uint8): (1, 32, 1, "MXFP8"),
    (torch.uint8, torch.uint8): (2, 32, 0.5, "MXFP4"),
}


@dataclasses.dataclass(frozen=True)
class CombineOutput:
    """What a combine returns: ``dtype`` (the combined rows' float dtype), and for a quantised
    output its kernel ``mode`` (``None``: not quantised), scale buffer, layout and global scale."""

    dtype: torch.dtype | None
    mode: int | None = None
    scales: torch.Tensor | None = None
    layout: int = SF_LAYOUT_LINEAR
    global_scale: float = 1.0
    block: int = 1
    out_dtype: torch.dtype | None = None
    half_width: bool = False
    wire: int = 0  # the low-precision wire: 1 from a float16, 2 from a bfloat16 payload


def _low_precision(op: str, payload: Any, output_dtype: Any, scales: Any) -> CombineOutput:
    """use_low_precision=True: MXFP8 rows on the wire, a bfloat16 sum (or output_dtype's)."""
    payload_dtype = getattr(payload, "dtype", None)
    if payload_dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"{op}: use_low_precision=True sends float16 or bfloat16 payloads as MXFP8, got "
            f"{payload_dtype}"
        )
    if scales is not None or output_dtype in (torch.uint8, torch.float8_e4m3fn):
        raise NotImplementedError(
            f"{op}: use_low_precision=True with a quantised output (output_scales, "
            f"output_dtype {output_dtype}) is not implemented"
        )
    if output_dtype is not None and output_dtype not in COMBINE_DTYPES:
        raise NotImplementedError(f"{op}: output_dtype {output_dtype} is not implemented")
    dtype = torch.bfloat16 if output_dtype is None else output_dtype
    return CombineOutput(dtype, wire=1 if payload_dtype == torch.float16 else 2)


def _combine_output_dtype(
    op: str, payload: Any, output_dtype: Any, scales: Any, scalar: Any, layout: Any, low: Any
) -> CombineOutput:
    """The output of a combine, checked before any launch; what is not implemented is refused."""
    try:
        scalar = float(scalar)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: output_scalar_scale must be a float, got {scalar!r}") from None
    if isinstance(layout, bool) or not isinstance(layout, int) or int(layout) not in SF_LAYOUTS:
        raise ValueError(f"{op}: sf_layout ({layout!r}) must be an SfLayout value {SF_LAYOUTS}")
    if output_dtype is not None and not isinstance(output_dtype, torch.dtype):
        raise TypeError(f"{op}: output_dtype must be a torch.dtype, got {output_dtype!r}")
    if not isinstance(low, int):  # bool or 0 / 1
        raise TypeError(f"{op}: use_low_precision must be a bool, got {low!r}")
    if low:
        if scalar != 1.0:
            raise ValueError(
                f"{op}: output_scalar_scale ({scalar}) is the global scale of NVFP4 outputs; "
                "with use_low_precision=True it must be 1.0"
            )
        return _low_precision(op, payload, output_dtype, scales)
    if scales is None:
        if output_dtype in (torch.uint8, torch.float8_e4m3fn):
            raise ValueError(
                f"{op}: output_dtype {output_dtype} is a quantised output and needs output_scales "
                "(uint8 UE8M0 scales for MXFP8 / MXFP4, float8_e4m3fn scales for NVFP4)"
            )
        if scalar != 1.0:
            raise ValueError(
                f"{op}: output_scalar_scale ({scalar}) is the global scale of NVFP4 outputs; "
                "without output_scales it must be 1.0"
            )
        if output_dtype is None:
            return CombineOutput(getattr(payload, "dtype", None))
        if output_dtype not in COMBINE_DTYPES:
            raise NotImplementedError(
                f"{op}: output_dtype {output_dtype} is not implemented; float16, bfloat16 and "
                "float32, or with output_scales float8_e4m3fn (MXFP8) and uint8 (NVFP4, MXFP4)"
            )
        return CombineOutput(output_dtype)
    scales = _tensor(op, "output_scales", scales)
    kind = QUANT_OUTPUTS.get((output_dtype, scales.dtype))
    if kind is None:
        raise TypeError(
            f"{op}: output_scales ({scales.dtype}) with output_dtype {output_dtype}: the "
            "quantised outputs are float8_e4m3fn with uint8 scales (MXFP8), uint8 with uint8 "
            "scales (MXFP4) and uint8 with float8_e4m3fn scales (NVFP4)"
        )
    mode, block, width, name = kind
    payload_dtype = getattr(payload, "dtype", None)
    if payload_dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"{op}: {name} outputs quantise a float16 or bfloat16 payload, got {payload_dtype}"
        )
    if mode != 0 and scalar != 1.0:
        raise ValueError(
            f"{op}: output_scalar_scale ({scalar}) is the global scale of NVFP4 outputs; "
            f"{name} takes none (pass 1.0)"
        )
    if mode == 0 and not (math.isfinite(scalar) and scalar > 0.0):
        raise ValueError(f"{op}: output_scalar_scale ({scalar}) must be finite and positive")
    return CombineOutput(payload_dtype, mode, scales, int(layout), scalar, block, output_dtype,
                         width != 1)  # fmt: skip


def _check_wire(op: str, spec: CombineOutput, hidden: int) -> None:
    if spec.wire and (hidden % 32 or hidden > MAX_QUANT_HIDDEN):
        raise ValueError(
            f"{op}: use_low_precision=True needs hidden ({hidden}) a multiple of 32, at most "
            f"{MAX_QUANT_HIDDEN} (MXFP8 rows on the wire)"
        )


def _check_quantised(op: str, spec: CombineOutput, local: int, hidden: int, device) -> None:
    """Shapes of a quantised output's scale buffer (the output itself: _quantised_output)."""
    name = next(v[3] for v in QUANT_OUTPUTS.values() if v[0] == spec.mode)
    if hidden % spec.block:
        raise ValueError(f"{op}: hidden ({hidden}) must be a multiple of {spec.block} for {name}")
    if hidden > MAX_QUANT_HIDDEN:
        raise ValueError(f"{op}: hidden ({hidden}) must be at most {MAX_QUANT_HIDDEN} for {name}")
    scales = spec.scales
    need = scale_factor_buffer_size(local, hidden // spec.block, spec.layout)
    if scales.device != device or not scales.is_contiguous() or scales.numel() != need:
        raise ValueError(
            f"{op}: output_scales ({tuple(scales.shape)}, {scales.device}) must be a contiguous "
            f"tensor of exactly {need} scale bytes on {device} ({local} rows, "
            f"{hidden // spec.block} scale columns, sf_layout {spec.layout})"
        )


def _quantised_output(op: str, spec: CombineOutput, output: Any, local: int, hidden: int, device):
    width = hidden // 2 if spec.half_width else hidden
    if output is None:
        return torch.empty((local, width), dtype=spec.out_dtype, device=device)
    output = _tensor(op, "output", output)
    if (
        tuple(output.shape) != (local, width)
        or output.dtype != spec.out_dtype
        or output.device != device
        or not output.is_contiguous()
        or output.data_ptr() % 8
    ):
        raise ValueError(
            f"{op}: output ({tuple(output.shape)}, {output.dtype}, {output.device}) must be a "
            f"contiguous, 8-byte aligned [{local}, {width}] {spec.out_dtype} tensor on {device}"
        )
    return output
