"""The legacy TRT-LLM custom all-reduce (deprecated; kept because the API lists it).

``trtllm_custom_all_reduce`` runs on the Lamport fusion kernels over the seven-buffer workspace
of ``trtllm_create_ipc_workspace_for_all_reduce`` (runtime/legacy_workspace.py says how the
buffers map onto the kernels). Every argument is checked as the legacy kernel would, before
anything is launched; then:

==================  =====================================================================
strategy_code       what runs
==================  =====================================================================
ONESHOT, MIN_LAT.   16-bit: the Lamport one-shot over the three Lamport buffers when the
                    call fits one (``tp_size * N * D * 2`` bytes), else two-shot; fp32:
                    two-shot (a 16-bit sentinel fill is not empty for 32-bit cells)
TWOSHOT             the two-shot over the comm buffer (ping or pong, as passed) and the
                    barrier-in flags
AUTO                the fusion planner's choice (one-shot for small calls), fp32 two-shot
NCCL                ``torch.distributed.all_reduce`` over the workspace's process group, the
                    epilogue in torch (a one-time note says so); no group: ValueError
UB, LOWPRECISION    NotImplementedError (user buffers and low-precision all-reduce are not
                    provided)
==================  =====================================================================

Numerics (all kernel paths, every rank bitwise equal): fp32 sum in rank order, one rounding;
``bias`` is folded into the residual (``rd_T(residual + bias)``) and the fused RMSNorm of
``kARResidualRMSNorm`` runs on it. ``fusedcomm.reference.legacy`` is the reference.
"""

from __future__ import annotations

import logging
import math
import numbers

import torch

from ..enums import AllReduceFusionOp, AllReduceStrategyConfig, AllReduceStrategyType
from ..enums import AllReduceFusionPattern as _P
from ..reference.legacy import fold_bias, legacy_epilogue
from ..runtime.legacy_workspace import find_legacy_workspace
from . import _fusion_launch
from ._register import register_op, tracing
from .allreduce_fusion import _ELEM, _deprecated_once, _flag, _int

__all__ = ["trtllm_custom_all_reduce"]

_log = logging.getLogger("fusedcomm")
_S = AllReduceStrategyType
_F = AllReduceFusionOp
_LEGACY_WORLD_SIZES = (2, 4, 6, 8, 16)
_MAX_WORLD = 8  # the kernels' kMaxRanks
_MAX_ROW_BYTES = 131072
_PREPOST_MAX_HIDDEN = 8192
_STRATEGIES = {
    _S.ONESHOT: "oneshot",
    _S.MIN_LATENCY: "oneshot",
    _S.TWOSHOT: "twoshot",
    _S.AUTO: "auto",
    _S.NCCL: "nccl",
}
_UNSUPPORTED_STRATEGIES = {
    _S.UB: "UB (user-buffer registration)",
    _S.LOWPRECISION: "LOWPRECISION (quantised all-reduce)",
}
_OPS = (_F.NONE, _F.RESIDUAL_RMS_NORM, _F.RESIDUAL_RMS_PREPOST_NORM)
_POINTER_ARGS = (
    "peer_comm_buffer_ptrs",
    "peer_barrier_ptrs_in",
    "peer_barrier_ptrs_out",
    "lamport_peer_comm_buffer_ptrs_0",
    "lamport_peer_comm_buffer_ptrs_1",
    "lamport_peer_comm_buffer_ptrs_2",
)
_noted: set[str] = set()


def _strategy(op: str, code) -> str:
    _int(op, "strategy_code", code, 0)
    if code in _UNSUPPORTED_STRATEGIES:
        raise NotImplementedError(
            f"{op}: strategy_code {_UNSUPPORTED_STRATEGIES[code]} is not provided; use "
            "ONESHOT (4), TWOSHOT (5), AUTO (3) or NCCL (0)"
        )
    if code not in _STRATEGIES:
        raise ValueError(
            f"{op}: strategy_code ({code}) must be an AllReduceStrategyType value (0..6)"
        )
    return _STRATEGIES[code]


def _fusion_op(op: str, code) -> int:
    _int(op, "fusion_op_code", code, 0)
    if code not in _OPS:
        raise NotImplementedError(
            f"{op}: fusion_op_code ({code}) is not supported (NONE, RESIDUAL_RMS_NORM, "
            "RESIDUAL_RMS_PREPOST_NORM); the quantising and MoE epilogues are patterns of "
            "allreduce_fusion"
        )
    return code


def _vector(op: str, name: str, t, inp: torch.Tensor, hidden: int):
    """An optional per-column vector (bias, weights): None or ``hidden`` elements of T."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.dtype != inp.dtype:
        raise TypeError(f"{op}: {name}.dtype ({t.dtype}) must be the input's ({inp.dtype})")
    if t.numel() != hidden:
        raise ValueError(f"{op}: {name} has {t.numel()} elements, expected hidden ({hidden})")
    return t.reshape(-1).contiguous()


def _rows(op: str, name: str, t, inp: torch.Tensor, required: bool):
    if t is None and not required:
        return None
    if not isinstance(t, torch.Tensor) or t.numel() != inp.numel():
        raise ValueError(f"{op}: {name} must be a tensor of {inp.numel()} elements")
    if t.dtype != inp.dtype:
        raise TypeError(f"{op}: {name}.dtype ({t.dtype}) must be the input's ({inp.dtype})")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")
    return t


def _eps(op: str, eps) -> float:
    if eps is None:
        return 1e-5
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: eps must be a float or None, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps ({eps}) must be finite and >= 0")
    return float(eps)


def _on_device(op: str, inp: torch.Tensor, tensors: dict) -> None:
    """Every tensor on the input's CUDA device (the only check that needs a GPU tensor)."""
    if not inp.is_cuda:
        raise ValueError(f"{op}: inp must be a CUDA tensor, got one on {inp.device}")
    for name, t in tensors.items():
        if t is not None and t.device != inp.device:
            raise ValueError(f"{op}: {name} is on {t.device}, inp on {inp.device}")


def _ones(ws, dtype: torch.dtype, hidden: int, device: torch.device) -> torch.Tensor:
    """RMSNorm weights of 1 (calls without ``weight``), made once per (dtype, hidden)."""
    ones = ws.ones.get((dtype, hidden))
    if ones is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"trtllm_custom_all_reduce: weight=None with hidden {hidden} (not the "
                f"workspace's {ws.hidden_dim}) needs one eager call before CUDA graph capture"
            )
        ones = ws.ones[(dtype, hidden)] = torch.ones(hidden, dtype=dtype, device=device)
    return ones


def _nccl(op: str, ws, inp, fusion_op, out, intermediate, epilogue) -> None:
    group = getattr(ws.backend, "group", None)
    if group is None:
        raise ValueError(
            f"{op}: strategy_code NCCL runs torch.distributed.all_reduce over the workspace's "
            f"process group, and this workspace was created over {type(ws.backend).__name__}, "
            "which has none; use ONESHOT, TWOSHOT or AUTO"
        )
    if op not in _noted:
        _noted.add(op)
        _log.warning(
            "%s: strategy NCCL: torch.distributed.all_reduce on the workspace's group, then the "
            "epilogue in torch (not fused; ranks may differ in the last bit)",
            op,
        )
    import torch.distributed as dist

    reduced = inp.clone()
    dist.all_reduce(reduced, group=group)
    _torch_epilogue(reduced, fusion_op, out, intermediate, epilogue)


def _torch_epilogue(reduced, fusion_op, out, intermediate, epilogue) -> None:
    y, inter = legacy_epilogue(reduced, fusion_op, **epilogue)
    out.view(y.shape).copy_(y)
    if inter is not None:
        intermediate.view(inter.shape).copy_(inter)


def trtllm_custom_all_reduce(
    inp,
    out,
    tp_size,
    tp_rank,
    token_num,
    fusion_op_code,
    strategy_code,
    config_code,
    launch_with_pdl,
    flag_value,
    peer_comm_buffer_ptrs,
    peer_barrier_ptrs_in,
    peer_barrier_ptrs_out,
    bias,
    residual,
    weight,
    weight_pre_residual_norm,
    eps,
    intermediate_buffer,
    lamport_peer_comm_buffer_ptrs_0,
    lamport_peer_comm_buffer_ptrs_1,
    lamport_peer_comm_buffer_ptrs_2,
) -> None:
    """The legacy all-reduce (deprecated: use allreduce_fusion). Writes ``out``.

    Unfused equivalent (``x_q``: rank q's ``inp``, ``[token_num, D]``; see
    ``fusedcomm.reference.legacy.legacy_epilogue`` for the rounding of each step)::

        s = sum over q of x_q                                   (fp32, rank order, rd_T)
        NONE:                      out = s
        RESIDUAL_RMS_NORM:         intermediate_buffer = s + bias + residual
                                   out = RMSNorm(intermediate_buffer) * weight
        RESIDUAL_RMS_PREPOST_NORM: pre = RMSNorm(s + bias) * weight_pre_residual_norm
                                   intermediate_buffer = pre + residual
                                   out = RMSNorm(intermediate_buffer) * weight  (D <= 8192)

    ``bias``/``weight``/``weight_pre_residual_norm``: ``[D]`` of T or None (no bias, weights
    of 1); ``eps`` None -> 1e-5. ``hidden D = inp.numel() / token_num``; T fp16, bf16 or fp32;
    ``tp_size`` 2, 4, 6 or 8 (16: NotImplementedError). The pointer arguments are the CPU
    int64 tensors of the workspace's lists (``torch.tensor(workspace[k])``; ``[0]`` or ``[1]``
    for ``peer_comm_buffer_ptrs``). ``config_code`` (USE_MEMCPY or PUSH_MODE) is checked and
    changes nothing. ``flag_value`` (an int >= 1) is checked and not needed: the workspace
    keeps its protocol state on the device, so any sequence of flag values works and calls
    replay inside CUDA graphs. Every rank must make the same sequence of calls on a workspace
    with the same shapes. The kernel paths give every rank the same bits; a wait for a peer
    that does not come raises (``PeerTimeoutError``, at the next call or ``check_errors()``)
    and the workspace is then refused on every rank. Registered as
    ``torch.ops.fusedcomm.trtllm_custom_all_reduce`` (``out`` and ``intermediate_buffer``
    marked as written), which torch.compile calls while it traces.
    """
    args = (
        inp,
        out,
        tp_size,
        tp_rank,
        token_num,
        fusion_op_code,
        strategy_code,
        config_code,
        launch_with_pdl,
        flag_value,
        peer_comm_buffer_ptrs,
        peer_barrier_ptrs_in,
        peer_barrier_ptrs_out,
        bias,
        residual,
        weight,
        weight_pre_residual_norm,
        eps,
        intermediate_buffer,
        lamport_peer_comm_buffer_ptrs_0,
        lamport_peer_comm_buffer_ptrs_1,
        lamport_peer_comm_buffer_ptrs_2,
    )
    if tracing():  # torch.compile: the registered op (schema below), run at graph time
        _custom_op(*args)
        return
    _deprecated_once("trtllm_custom_all_reduce", "allreduce_fusion")
    _impl(*args)


def _impl(
    inp,
    out,
    tp_size,
    tp_rank,
    token_num,
    fusion_op_code,
    strategy_code,
    config_code,
    launch_with_pdl,
    flag_value,
    peer_comm_buffer_ptrs,
    peer_barrier_ptrs_in,
    peer_barrier_ptrs_out,
    bias,
    residual,
    weight,
    weight_pre_residual_norm,
    eps,
    intermediate_buffer,
    lamport_peer_comm_buffer_ptrs_0,
    lamport_peer_comm_buffer_ptrs_1,
    lamport_peer_comm_buffer_ptrs_2,
) -> None:
    op = "trtllm_custom_all_reduce"
    for name, value in (("inp", inp), ("out", out)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")
    elem = _ELEM.get(inp.dtype)
    if elem is None:
        raise TypeError(f"{op}: dtype ({inp.dtype}) must be float16, bfloat16 or float32")
    if out.dtype != inp.dtype or out.numel() != inp.numel():
        raise ValueError(
            f"{op}: out ({out.dtype}, {out.numel()} elements) must match inp "
            f"({inp.dtype}, {inp.numel()})"
        )
    for name, t in (("inp", inp), ("out", out)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
    _int(op, "tp_size", tp_size, 1)
    if tp_size not in _LEGACY_WORLD_SIZES:
        raise ValueError(f"{op}: tp_size ({tp_size}) must be one of {_LEGACY_WORLD_SIZES}")
    _int(op, "tp_rank", tp_rank, 0)
    if tp_rank >= tp_size:
        raise ValueError(f"{op}: tp_rank ({tp_rank}) must be < tp_size ({tp_size})")
    _int(op, "token_num", token_num, 1)
    if inp.numel() % token_num or inp.numel() == 0:
        raise ValueError(
            f"{op}: inp.numel() ({inp.numel()}) must be a positive multiple of token_num "
            f"({token_num})"
        )
    hidden = inp.numel() // token_num
    fusion_op = _fusion_op(op, fusion_op_code)
    strategy = _strategy(op, strategy_code)
    both = AllReduceStrategyConfig.USE_MEMCPY | AllReduceStrategyConfig.PUSH_MODE
    _int(op, "config_code", config_code, 0)
    if config_code & ~both or config_code == both:
        raise ValueError(
            f"{op}: config_code ({config_code}) must combine USE_MEMCPY or PUSH_MODE, not both"
        )
    vec = 16 // elem * (tp_size if strategy_code == _S.TWOSHOT else 1)
    if inp.numel() % vec:
        raise ValueError(
            f"{op}: inp.numel() ({inp.numel()}) must be a multiple of {vec} for "
            "this strategy and dtype"
        )
    if strategy != "nccl" and (hidden % (16 // elem) or hidden * elem > _MAX_ROW_BYTES):
        raise ValueError(
            f"{op}: hidden ({hidden} = inp.numel() / token_num) must be a multiple of "
            f"{16 // elem} and at most {_MAX_ROW_BYTES // elem} for {inp.dtype}"
        )
    if fusion_op == _F.RESIDUAL_RMS_PREPOST_NORM and hidden > _PREPOST_MAX_HIDDEN:
        raise ValueError(
            f"{op}: RESIDUAL_RMS_PREPOST_NORM needs hidden ({hidden}) <= {_PREPOST_MAX_HIDDEN}"
        )
    _flag(op, "launch_with_pdl", launch_with_pdl)
    _int(op, "flag_value", flag_value, 1)
    if flag_value >= 1 << 32:
        raise ValueError(f"{op}: flag_value ({flag_value}) must fit 32 bits")
    lists = {}
    for name, ptrs in zip(
        _POINTER_ARGS,
        (
            peer_comm_buffer_ptrs,
            peer_barrier_ptrs_in,
            peer_barrier_ptrs_out,
            lamport_peer_comm_buffer_ptrs_0,
            lamport_peer_comm_buffer_ptrs_1,
            lamport_peer_comm_buffer_ptrs_2,
        ),
    ):
        if (
            not isinstance(ptrs, torch.Tensor)
            or ptrs.device.type != "cpu"
            or ptrs.dtype != torch.int64
            or ptrs.numel() != tp_size
        ):
            raise ValueError(
                f"{op}: {name} must be a CPU int64 tensor of tp_size ({tp_size}) pointers"
            )
        lists[name] = ptrs.reshape(-1)
    fused = fusion_op != _F.NONE
    residual = _rows(op, "residual", residual, inp, fused)
    intermediate = _rows(op, "intermediate_buffer", intermediate_buffer, inp, fused)
    bias = _vector(op, "bias", bias, inp, hidden) if fused else None
    weight = _vector(op, "weight", weight, inp, hidden) if fused else None
    w_pre = None
    if fusion_op == _F.RESIDUAL_RMS_PREPOST_NORM:
        w_pre = _vector(op, "weight_pre_residual_norm", weight_pre_residual_norm, inp, hidden)
    eps = _eps(op, eps)
    if tp_size > _MAX_WORLD:
        raise NotImplementedError(
            f"{op}: tp_size ({tp_size}) is above the {_MAX_WORLD} ranks the kernels serve"
        )
    _on_device(
        op,
        inp,
        {
            "out": out,
            "residual": residual,
            "intermediate_buffer": intermediate,
            "bias": bias,
            "weight": weight,
            "weight_pre_residual_norm": w_pre,
        },
    )
    ws, table = find_legacy_workspace(op, tp_rank, lists)
    if (ws.world, ws.rank) != (tp_size, tp_rank):
        raise ValueError(
            f"{op}: the workspace is rank {ws.rank} of {ws.world}, the call says rank "
            f"{tp_rank} of {tp_size}"
        )
    if inp.numel() > ws.capacity:
        raise ValueError(
            f"{op}: inp has {inp.numel()} elements, above the workspace's capacity "
            f"max_token_num * hidden_dim ({ws.max_token_num} * {ws.hidden_dim} = {ws.capacity})"
        )
    ws.control.failure.check(op)

    rows = (token_num, hidden)
    epilogue = dict(
        bias=bias, residual=residual, weight=weight, weight_pre_residual_norm=w_pre, eps=eps
    )
    if fused:
        epilogue["residual"] = residual.view(rows)
    if strategy == "nccl":
        _nccl(op, ws, inp.view(rows), fusion_op, out, intermediate, epilogue)
        return
    use_oneshot = {"oneshot": True, "twoshot": False, "auto": None}[strategy]
    if elem == 4:
        use_oneshot = False
    x = inp.view(rows)
    if fusion_op == _F.RESIDUAL_RMS_NORM:
        call = _fusion_launch.FusionCall(
            pattern=_P.kARResidualRMSNorm,
            input=x,
            token_num=token_num,
            hidden_dim=hidden,
            world_size=tp_size,
            rank=tp_rank,
            workspace_ptrs=table,
            launch_with_pdl=launch_with_pdl,
            fp32_acc=True,
            use_oneshot=use_oneshot,
            residual_in=fold_bias(residual.view(rows), bias),
            residual_out=intermediate.view(rows),
            norm_out=out.view(rows),
            rms_gamma=weight if weight is not None else _ones(ws, inp.dtype, hidden, inp.device),
            rms_eps=eps,
        )
        _fusion_launch.launch(call)
        return
    reduced = out.view(rows) if fusion_op == _F.NONE else torch.empty_like(x)
    call = _fusion_launch.FusionCall(
        pattern=_P.kAllReduce,
        input=x,
        token_num=token_num,
        hidden_dim=hidden,
        world_size=tp_size,
        rank=tp_rank,
        workspace_ptrs=table,
        launch_with_pdl=launch_with_pdl,
        fp32_acc=True,
        use_oneshot=use_oneshot,
        allreduce_out=reduced,
    )
    _fusion_launch.launch(call)
    if fusion_op == _F.RESIDUAL_RMS_PREPOST_NORM:  # the two norms in torch, after the sum
        _torch_epilogue(reduced, fusion_op, out, intermediate, epilogue)


_custom_op = register_op(
    "trtllm_custom_all_reduce(Tensor inp, Tensor(a!) out, int tp_size, int tp_rank, "
    "int token_num, int fusion_op_code, int strategy_code, int config_code, "
    "bool launch_with_pdl, int flag_value, Tensor peer_comm_buffer_ptrs, "
    "Tensor peer_barrier_ptrs_in, Tensor peer_barrier_ptrs_out, Tensor? bias, Tensor? residual, "
    "Tensor? weight, Tensor? weight_pre_residual_norm, float? eps, "
    "Tensor(b!)? intermediate_buffer, Tensor lamport_peer_comm_buffer_ptrs_0, "
    "Tensor lamport_peer_comm_buffer_ptrs_1, Tensor lamport_peer_comm_buffer_ptrs_2) -> ()",
    lambda *args: _impl(*args),
    lambda *args: None,
)
