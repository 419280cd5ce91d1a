"""The legacy trtllm_custom_all_reduce on CPU (device layer faked): every argument rule, the
seven-list workspace, the call each strategy and fusion op hands the kernels, the pointer-list
checks, and the reference."""

import types
import warnings

import pytest
import torch

import fusedcomm as comm
import fusion_fakes
from fusedcomm.enums import AllReduceFusionOp as F
from fusedcomm.enums import AllReduceStrategyType as S
from fusedcomm.ops import allreduce_legacy
from fusedcomm.reference.fusion import fusion_all_reduce, residual_rms_norm
from fusedcomm.reference.legacy import custom_all_reduce_reference, legacy_epilogue
from fusedcomm.runtime import legacy_workspace
from fusion_fakes import BF16, FakeBackend

dev = fusion_fakes.dev  # the fixture
N, D = 4, 64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _args(ptrs=None, **kw):
    x = torch.randn(N, D).to(BF16)
    ptrs = [torch.zeros(2, dtype=torch.int64)] * 7 if ptrs is None else ptrs
    a = dict(
        inp=x,
        out=torch.empty_like(x),
        tp_size=2,
        tp_rank=0,
        token_num=N,
        fusion_op_code=F.NONE,
        strategy_code=S.ONESHOT,
        config_code=0,
        launch_with_pdl=False,
        flag_value=1,
        peer_comm_buffer_ptrs=ptrs[0],
        peer_barrier_ptrs_in=ptrs[2],
        peer_barrier_ptrs_out=ptrs[3],
        bias=None,
        residual=None,
        weight=None,
        weight_pre_residual_norm=None,
        eps=None,
        intermediate_buffer=None,
        lamport_peer_comm_buffer_ptrs_0=ptrs[4],
        lamport_peer_comm_buffer_ptrs_1=ptrs[5],
        lamport_peer_comm_buffer_ptrs_2=ptrs[6],
    )
    a.update(kw)
    return a


def _fused(**kw):
    a = dict(
        fusion_op_code=F.RESIDUAL_RMS_NORM,
        residual=torch.randn(N, D).to(BF16),
        intermediate_buffer=torch.empty(N, D, dtype=BF16),
    )
    a.update(kw)
    return a


# ------------------------------------------------------------------------------------------
# Argument rules (all before any device work)


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({}, ValueError, "inp must be a CUDA tensor"),  # every check passed: the device next
        ({"strategy_code": S.UB}, NotImplementedError, "UB"),
        ({"strategy_code": S.LOWPRECISION}, NotImplementedError, "LOWPRECISION"),
        ({"strategy_code": 7}, ValueError, "AllReduceStrategyType"),
        ({"strategy_code": True}, TypeError, "strategy_code"),
        ({"tp_size": 3}, ValueError, "tp_size"),
        ({"tp_rank": 2}, ValueError, "tp_rank"),
        ({"config_code": 3}, ValueError, "not both"),
        ({"config_code": 4}, ValueError, "config_code"),
        ({"fusion_op_code": F.RESIDUAL_RMS_NORM_QUANT_FP8}, NotImplementedError, "fusion_op"),
        ({"fusion_op_code": F.LAST_PROCESS_FOR_UB}, NotImplementedError, "fusion_op"),
        ({"fusion_op_code": F.MOE_ALLREDUCE_RESIDUAL_RMS_NORM}, NotImplementedError, "fusion"),
        ({"fusion_op_code": 1}, ValueError, "residual"),
        ({"out": torch.empty(N, D)}, ValueError, "must match inp"),
        ({"inp": torch.zeros(N, D, dtype=torch.int32)}, TypeError, "dtype"),
        ({"token_num": 3}, ValueError, "multiple of token_num"),
        ({"token_num": 0}, ValueError, "token_num"),
        ({"inp": torch.zeros(8, 3).to(BF16), "out": torch.zeros(24).to(BF16)}, ValueError, "8"),
        (
            {
                "strategy_code": S.TWOSHOT,
                "token_num": 1,
                "inp": torch.zeros(24).to(BF16),
                "out": torch.zeros(24).to(BF16),
            },
            ValueError,
            "multiple of 16",
        ),
        (
            {"token_num": 8, "inp": torch.zeros(32).to(BF16), "out": torch.zeros(32).to(BF16)},
            ValueError,
            "hidden",
        ),
        ({"launch_with_pdl": 1}, TypeError, "launch_with_pdl"),
        ({"flag_value": 0}, ValueError, "flag_value"),
        ({"flag_value": 1 << 32}, ValueError, "32 bits"),
        ({"peer_barrier_ptrs_in": torch.zeros(3, dtype=torch.int64)}, ValueError, "barrier"),
        ({"peer_comm_buffer_ptrs": [0, 0]}, ValueError, "peer_comm_buffer_ptrs"),
        ({"lamport_peer_comm_buffer_ptrs_2": torch.zeros(2)}, ValueError, "lamport"),
        (_fused(bias=torch.zeros(D)), TypeError, "bias.dtype"),
        (_fused(weight=torch.zeros(D + 1).to(BF16)), ValueError, "weight has"),
        (_fused(eps=-1.0), ValueError, "eps"),
        (_fused(eps="1e-5"), TypeError, "eps"),
        (_fused(intermediate_buffer=torch.empty(N, D)), TypeError, "intermediate_buffer"),
        (
            _fused(fusion_op_code=F.RESIDUAL_RMS_PREPOST_NORM, weight_pre_residual_norm=1.0),
            TypeError,
            "weight_pre_residual_norm",
        ),
        ({"inp": torch.zeros(N, 2 * D).to(BF16).t()}, ValueError, "contiguous"),
    ],
)
def test_argument_rules(kw, error, match):
    if "inp" in kw and "out" not in kw:
        kw["out"] = torch.empty(kw["inp"].shape, dtype=kw["inp"].dtype)
    with pytest.raises(error, match=match):
        comm.trtllm_custom_all_reduce(**_args(**kw))


def test_tp_size_16_is_refused_clearly():
    ptrs = [torch.zeros(16, dtype=torch.int64)] * 7
    with pytest.raises(NotImplementedError, match="8 ranks"):
        comm.trtllm_custom_all_reduce(**_args(ptrs, tp_size=16))


def test_every_argument_is_required():
    with pytest.raises(TypeError):
        comm.trtllm_custom_all_reduce(*list(_args().values())[:-1])


# ------------------------------------------------------------------------------------------
# The workspace and the calls the kernels get (device layer faked)


@pytest.fixture
def legacy(dev, monkeypatch):
    """A legacy workspace (rank 0 of 2, 16 tokens of 256) over the fakes; calls accept CPU
    tensors."""
    monkeypatch.setattr(allreduce_legacy, "_on_device", lambda op, inp, tensors: None)
    handles = comm.trtllm_create_ipc_workspace_for_all_reduce(
        0, 2, 16, 256, comm_backend=FakeBackend()
    )
    control = dev.controls[-1][0]
    control.failure = types.SimpleNamespace(check=lambda op: None)
    yield handles, [torch.tensor(h, dtype=torch.int64) for h in handles]
    if handles[0][0] in legacy_workspace._BY_COMM:
        comm.trtllm_destroy_ipc_workspace_for_all_reduce(handles)


def test_seven_lists_over_five_buffers(dev, legacy):
    handles, _ = legacy
    sizes = [size for kind, size in (c for c in dev.calls if c[0] == "alloc")]
    segment = 2 * 16 * 2 * 256 * 2
    flags = (24 + 1) * 4 * 2 * 2
    assert sizes == [2 * 16 * 256 * 4] * 2 + [max(flags, 2 * 256 * 4), flags, 3 * segment]
    assert len(handles) == 7 and all(len(h) == 2 for h in handles)
    for k in (1, 2):  # the Lamport buffers: consecutive segments of one allocation
        assert [p - b for p, b in zip(handles[4 + k], handles[4])] == [k * segment] * 2
    assert ("lamport_all", segment) in dev.calls
    assert dev.controls[-1][1] == segment
    ws = legacy_workspace._BY_COMM[handles[0][0]]
    assert ws.tables[0].tolist() == handles[0] + handles[2] + handles[4] + [0xC0DE00]
    assert ws.tables[1].tolist()[:2] == handles[1]


@pytest.mark.parametrize(
    "strategy,dtype,oneshot",
    [
        (S.ONESHOT, BF16, True),
        (S.MIN_LATENCY, torch.float16, True),
        (S.TWOSHOT, BF16, False),
        (S.AUTO, BF16, None),
        (S.ONESHOT, torch.float32, False),  # never Lamport over a 16-bit sentinel fill
        (S.AUTO, torch.float32, False),
    ],
)
def test_strategy_mapping(dev, legacy, strategy, dtype, oneshot):
    _, ptrs = legacy
    x = torch.randn(N, D).to(dtype)
    out = torch.empty_like(x)
    comm.trtllm_custom_all_reduce(**_args(ptrs, inp=x, out=out, strategy_code=strategy))
    call = dev.launches[-1]
    assert call.pattern == 0 and call.use_oneshot is oneshot and call.fp32_acc
    assert call.allreduce_out.data_ptr() == out.data_ptr() and call.input.shape == (N, D)


def test_rms_norm_call_folds_bias_and_defaults(dev, legacy):
    _, ptrs = legacy
    kw = _fused(bias=torch.randn(D).to(BF16), launch_with_pdl=True, config_code=2)
    comm.trtllm_custom_all_reduce(**_args(ptrs, **kw))
    call = dev.launches[-1]
    assert call.pattern == 1 and call.rms_eps == 1e-5 and call.launch_with_pdl
    want = (kw["residual"].float() + kw["bias"].float()).to(BF16)
    assert torch.equal(call.residual_in, want)
    assert call.residual_out.data_ptr() == kw["intermediate_buffer"].data_ptr()
    assert torch.equal(call.rms_gamma, torch.ones(D, dtype=BF16))
    weight = torch.randn(D).to(BF16)
    comm.trtllm_custom_all_reduce(**_args(ptrs, **_fused(weight=weight, eps=1e-6)))
    call = dev.launches[-1]
    assert (
        call.rms_gamma.data_ptr() == weight.data_ptr()
        and call.rms_eps == 1e-6
        and call.residual_in is not None
    )


def test_pong_buffer_selects_the_second_table(dev, legacy):
    handles, ptrs = legacy
    comm.trtllm_custom_all_reduce(**_args([ptrs[1]] + ptrs[1:]))
    ws = legacy_workspace._BY_COMM[handles[0][0]]
    assert dev.launches[-1].workspace_ptrs is ws.tables[1]


def test_prepost_norm_runs_the_sum_then_both_norms(dev, legacy, monkeypatch):
    _, ptrs = legacy

    def fake_launch(call):  # every rank holds the same input: the sum is 2 * x
        call.allreduce_out.copy_((call.input.float() * 2).to(call.input.dtype))

    monkeypatch.setattr(allreduce_legacy._fusion_launch, "launch", fake_launch)
    kw = _fused(
        fusion_op_code=F.RESIDUAL_RMS_PREPOST_NORM,
        bias=torch.randn(D).to(BF16),
        weight=torch.randn(D).to(BF16),
        weight_pre_residual_norm=torch.randn(D).to(BF16),
        eps=1e-6,
    )
    a = _args(ptrs, **kw)
    a["out"].fill_(float("nan"))
    comm.trtllm_custom_all_reduce(**a)
    out, inter = custom_all_reduce_reference(
        [a["inp"], a["inp"]],
        N,
        F.RESIDUAL_RMS_PREPOST_NORM,
        bias=kw["bias"],
        residual=kw["residual"],
        weight=kw["weight"],
        weight_pre_residual_norm=kw["weight_pre_residual_norm"],
        eps=1e-6,
    )
    assert torch.equal(a["out"], out) and torch.equal(kw["intermediate_buffer"], inter)


def test_registered_op_runs_the_same_call(dev, legacy):
    op = torch.ops.fusedcomm.trtllm_custom_all_reduce.default
    schema = str(op._schema)
    assert "Tensor(a!) out" in schema and "Tensor(b!)? intermediate_buffer" in schema
    _, ptrs = legacy
    a = _args(ptrs, **_fused(eps=1e-6))
    op(*a.values())
    call = dev.launches[-1]
    assert call.pattern == 1 and call.rms_eps == 1e-6 and call.use_oneshot is True
    assert call.norm_out.data_ptr() == a["out"].data_ptr()


def test_traces_under_torch_compile(dev, legacy):
    _, ptrs = legacy
    a = _args(ptrs, **_fused())

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layer(x, out, residual, inter):
        h = x * 1
        comm.trtllm_custom_all_reduce(
            **{**a, "inp": h, "out": out, "residual": residual, "intermediate_buffer": inter}
        )
        return out

    layer(a["inp"], a["out"], a["residual"], a["intermediate_buffer"])
    assert dev.launches and dev.launches[-1].pattern == 1


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda p: [p[0], p[1], p[3], p[2]] + p[4:], "peer_barrier_ptrs_in"),
        (lambda p: p[:4] + [p[5], p[4], p[6]], "lamport_peer_comm_buffer_ptrs_0"),
        (lambda p: [p[0].flip(0)] + p[1:], "not the comm buffer"),
        (lambda p: [p[0] + 16] + p[1:], "not the comm buffer"),
    ],
)
def test_pointer_lists_must_be_the_workspaces(dev, legacy, mutate, match):
    _, ptrs = legacy
    with pytest.raises(ValueError, match=match):
        comm.trtllm_custom_all_reduce(**_args(mutate(ptrs)))
    assert dev.launches == []


def test_workspace_rules(dev, legacy):
    handles, ptrs = legacy
    big = torch.zeros(32, 256).to(BF16)
    with pytest.raises(ValueError, match="capacity"):
        comm.trtllm_custom_all_reduce(
            **_args(ptrs, inp=big, out=torch.empty_like(big), token_num=32)
        )
    with pytest.raises(ValueError, match="has none"):  # the fake communicator has no group
        comm.trtllm_custom_all_reduce(**_args(ptrs, strategy_code=S.NCCL))
    ws = legacy_workspace._BY_COMM[handles[0][0]]
    ws.control.failure = types.SimpleNamespace(check=_refuse)
    with pytest.raises(comm.PeerTimeoutError):
        comm.trtllm_custom_all_reduce(**_args(ptrs))
    comm.trtllm_destroy_ipc_workspace_for_all_reduce(handles)
    assert dev.live == [] and dev.controls[-1][0].closed
    with pytest.raises(ValueError, match="not the comm buffer of a live workspace"):
        comm.trtllm_custom_all_reduce(**_args(ptrs))
    assert dev.launches == []


def _refuse(op):
    raise comm.PeerTimeoutError(f"{op}: refused", op=op, rank=0, peer=1, phase="x", waited_s=1.0)


def test_creation_rules(dev):
    with pytest.raises(NotImplementedError, match="8 ranks"):
        comm.trtllm_create_ipc_workspace_for_all_reduce(
            0, 16, 16, 256, comm_backend=FakeBackend(size=16)
        )
    with pytest.raises(ValueError, match="timeout_s"):
        comm.trtllm_create_ipc_workspace_for_all_reduce(
            0, 2, 16, 256, comm_backend=FakeBackend(), timeout_s=0
        )
    assert dev.calls == []


# ------------------------------------------------------------------------------------------
# The reference


def test_reference_epilogues():
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(N, D, generator=gen).to(BF16) for _ in range(2)]
    residual, bias, weight = (torch.randn(s, generator=gen).to(BF16) for s in ((N, D), D, D))
    s = fusion_all_reduce(xs, fp32_acc=True)
    out, inter = custom_all_reduce_reference(xs, N)
    assert torch.equal(out, s) and inter is None
    out, inter = custom_all_reduce_reference(
        xs, N, F.RESIDUAL_RMS_NORM, bias=bias, residual=residual, weight=weight
    )
    want_inter, want = residual_rms_norm(
        s, (residual.float() + bias.float()).to(BF16), weight, 1e-5
    )
    assert torch.equal(inter, want_inter) and torch.equal(out, want)
    ref = s.float() + bias.float() + residual.float()
    ref = ref * torch.rsqrt((ref * ref).mean(-1, keepdim=True) + 1e-5) * weight.float()
    torch.testing.assert_close(out.float(), ref, rtol=2**-6, atol=2**-6)
    out, inter = legacy_epilogue(s, F.RESIDUAL_RMS_PREPOST_NORM, residual=residual, eps=1e-6)
    pre = s.float() * torch.rsqrt((s.float() ** 2).mean(-1, keepdim=True) + 1e-6)
    v = pre + residual.float()
    torch.testing.assert_close(inter.float(), v, rtol=2**-6, atol=2**-6)
    y = v * torch.rsqrt((v * v).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out.float(), y, rtol=2**-5, atol=2**-5)
