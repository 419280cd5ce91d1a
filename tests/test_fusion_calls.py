"""allreduce_fusion and trtllm_allreduce_fusion on CPU (device layer faked): every argument
check before the launch, the FusionCall the kernels get, return values, torch.compile."""

import pytest
import torch

import fusedcomm as comm
import fusion_fakes
from fusedcomm.ops import _fusion_launch
from fusedcomm.reference.fusion import allreduce_fusion_reference
from fusion_fakes import BF16, D, M, W, make_ws

dev = fusion_fakes.dev  # the fixture

# ------------------------------------------------------------------------------------------
# allreduce_fusion: checks before the launch, the FusionCall, return values


@pytest.fixture
def ws(dev):
    w = make_ws()
    yield w
    w.destroy()


def tensors(n=8, d=D, dtype=BF16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    return {
        "input": x,
        "residual_in": torch.randn(n, d, generator=g).to(dtype),
        "rms_gamma": torch.randn(d, generator=g).to(dtype),
        "residual_out": torch.empty_like(x),
        "norm_out": torch.empty_like(x),
        "quant_out": torch.empty(n, d, dtype=torch.float8_e4m3fn),
        "scale_out": torch.empty(n, 1, dtype=torch.float32),
    }


OUTPUTS = {
    0: (),
    1: ("residual_out", "norm_out"),
    2: ("residual_out", "quant_out"),
    4: ("residual_out", "norm_out", "quant_out"),
    10: ("residual_out", "quant_out", "scale_out"),
    11: ("residual_out", "norm_out", "quant_out", "scale_out"),
}


def args_for(pattern, t, **extra):
    kw = {"input": t["input"], "pattern": pattern, **extra}
    if pattern:
        kw.update(residual_in=t["residual_in"], rms_gamma=t["rms_gamma"])
        kw.update({k: t[k] for k in OUTPUTS[pattern]})
    if pattern in (2, 4):
        kw.setdefault("scale_factor", 0.5)
    return kw


@pytest.mark.parametrize("pattern", sorted(OUTPUTS))
def test_fusion_call_and_return_value(ws, dev, pattern):
    t = tensors()
    ret = comm.allreduce_fusion(
        workspace=ws,
        launch_with_pdl=True,
        fp32_acc=True,
        trigger_completion_at_end=False,
        use_oneshot=True,
        weight_bias=1.0,
        rms_eps=1e-5,
        **args_for(pattern, t),
    )
    (call,) = dev.launches
    assert (call.pattern, call.token_num, call.hidden_dim) == (pattern, 8, D)
    assert (call.world_size, call.rank, call.input) == (W, 0, t["input"])
    assert call.workspace_ptrs is ws.workspace_tensor
    assert (call.launch_with_pdl, call.trigger_completion_at_end, call.fp32_acc) == (
        True,
        False,
        True,
    )
    assert call.use_oneshot is True and call.layout_code == 0
    if pattern == 0:
        assert call.allreduce_out is ret and ret.shape == t["input"].shape
        assert ret.dtype == BF16 and ret is not t["input"]
        assert call.residual_in is None and call.rms_gamma is None
        return
    assert call.residual_in is t["residual_in"] and call.rms_gamma is t["rms_gamma"]
    assert (call.rms_eps, call.weight_bias) == (1e-5, 1.0)
    for name in ("residual_out", "norm_out", "quant_out", "scale_out"):
        assert getattr(call, name) is (t[name] if name in OUTPUTS[pattern] else None), name
    assert call.allreduce_out is None
    if pattern in (2, 4):
        assert call.scale_factor.dtype == torch.float32 and call.scale_factor.tolist() == [0.5]
    else:
        assert call.scale_factor is None
    expected = t["norm_out"] if "norm_out" in OUTPUTS[pattern] else t["quant_out"]
    assert ret is expected


def test_pass_through_defaults_and_scale_tensor(ws, dev):
    t = tensors()
    out = torch.empty_like(t["input"])
    assert comm.allreduce_fusion(t["input"], ws, 0, output=out) is out
    call = dev.launches[-1]
    assert call.use_oneshot is None and not call.fp32_acc and call.trigger_completion_at_end
    assert not call.launch_with_pdl and call.weight_bias == 0.0
    scale = torch.tensor([0.25], dtype=BF16)
    comm.allreduce_fusion(**args_for(4, t, scale_factor=scale, layout_code=2), workspace=ws)
    call = dev.launches[-1]
    assert call.scale_factor.dtype == torch.float32 and call.scale_factor.tolist() == [0.25]
    assert call.layout_code == 2


def test_outputs_may_alias_inputs(ws, dev):
    t = tensors()
    x, res = t["input"], t["residual_in"]
    ret = comm.allreduce_fusion(
        x, ws, 1, residual_in=res, residual_out=res, norm_out=x, rms_gamma=t["rms_gamma"]
    )
    assert ret is x and dev.launches[-1].residual_out is res
    comm.allreduce_fusion(x, ws, 0, output=x)
    comm.allreduce_fusion(
        x, ws, 1, residual_in=res, residual_out=x, norm_out=t["norm_out"], rms_gamma=t["rms_gamma"]
    )
    assert len(dev.launches) == 3


@pytest.mark.parametrize("pattern", [3, 5, 8, 9])
def test_block_quant_patterns_reach_the_launch(ws, dev, pattern):
    t = tensors()
    kw = args_for(1, t, **(FP4 if pattern in (3, 5) else GROUP))
    kw["pattern"] = pattern
    if pattern in (3, 8):
        kw.pop("norm_out")
    if pattern in (3, 5):
        kw["layout_code"] = 1
    ret = comm.allreduce_fusion(workspace=ws, **kw)
    call = dev.launches[-1]
    assert call.pattern == pattern and call.scale_out is kw["scale_out"]
    if pattern in (3, 5):
        assert call.layout_code == 1 and call.scale_factor.tolist() == [1.0]
    else:
        assert call.block_quant_group_size == 128 and call.scale_factor is None
    assert ret is kw.get("norm_out", kw["quant_out"])


def Z(*shape, dtype=BF16):
    return torch.zeros(*shape, dtype=dtype)


F8, I32, F32, U8 = torch.float8_e4m3fn, torch.int32, torch.float32, torch.uint8
FP4 = {"quant_out": Z(8, D // 2, dtype=U8), "scale_out": Z(2048, dtype=U8), "scale_factor": 1.0}
GROUP = {
    "quant_out": Z(8, D, dtype=F8),
    "block_quant_group_size": 128,
    "scale_out": Z(1, 8, dtype=I32).t(),
}  # (N, K) with strides (1, M)
MOE6 = {
    "moe_reduction_device_num_experts": 2,
    "moe_reduction_scale_input": Z(1),
    "moe_reduction_active_experts_token_input": Z(1),
    "moe_reduction_token_input": Z(1),
}
BAD = [
    (1, {"norm_out": None}, ValueError, "kARResidualRMSNorm \\(1\\) writes or reads norm_out"),
    (1, {"residual_out": None}, ValueError, "residual_out"),
    (1, {"residual_in": None}, ValueError, "residual_in"),
    (1, {"rms_gamma": None}, ValueError, "rms_gamma"),
    (2, {"quant_out": None}, ValueError, "quant_out"),
    (2, {"scale_factor": None}, ValueError, "scale_factor"),
    (4, {"norm_out": None}, ValueError, "norm_out"),
    (10, {"scale_out": None}, ValueError, "scale_out"),
    (11, {"norm_out": None}, ValueError, "norm_out"),
    (1, {"input": Z(8, D, dtype=I32)}, TypeError, "dtype"),
    (0, {"input": Z(4, 2, D)}, ValueError, "2-D"),
    (0, {"input": Z(8, 100)}, ValueError, r"hidden_dim \(100\) must be a multiple of 8"),
    (0, {"input": Z(M + 1, D)}, ValueError, "capacity"),
    (0, {"input": Z(8, D, dtype=F32)}, ValueError, "use_fp32_lamport"),
    (0, {"input": Z(D, 8).t()}, ValueError, "allreduce_in must be contiguous"),
    (0, {"output": Z(8, D, dtype=torch.float16)}, TypeError, "allreduce_out.dtype"),
    (0, {"output": Z(9, D)}, ValueError, "allreduce_out has"),
    (1, {"norm_out": Z(D, 8).t()}, ValueError, "norm_out must be contiguous"),
    (1, {"residual_in": Z(8, D, dtype=F32)}, TypeError, "residual_in.dtype"),
    (1, {"rms_gamma": Z(D + 8)}, ValueError, "rms_gamma has"),
    (1, {"rms_gamma": Z(D, dtype=F32)}, TypeError, "rms_gamma.dtype"),
    (2, {"quant_out": Z(8, D)}, ValueError, "float8_e4m3fn"),
    (10, {"quant_out": Z(8 * D, dtype=F8)}, ValueError, "shape"),
    (10, {"scale_out": Z(8, dtype=F32)}, ValueError, r"\(8, 1\)"),
    (10, {"scale_out": Z(8, 1)}, ValueError, "float32"),
    (2, {"scale_factor": "x"}, TypeError, "scale_factor must be a float"),
    (2, {"scale_factor": Z(0, dtype=F32)}, ValueError, "empty"),
    (1, {"layout_code": 7}, ValueError, "layout_code"),
    (1, {"use_oneshot": 1}, TypeError, "use_oneshot must be a bool"),
    (1, {"launch_with_pdl": None}, TypeError, "launch_with_pdl"),
    (1, {"rms_eps": "tiny"}, TypeError, "rms_eps"),
    (99, {}, ValueError, r"pattern \(99\)"),
    (12, {}, ValueError, "CuTe-DSL"),
    (3, {}, ValueError, "quant_out"),
    (3, dict(FP4, scale_out=Z(64, dtype=U8)), ValueError, "SWIZZLED_128x4 needs 2048"),
    (
        5,
        dict(FP4, norm_out=Z(8, D), layout_code=2, scale_out=Z(127, dtype=U8)),
        ValueError,
        "LINEAR needs 128",
    ),
    (
        5,
        dict(FP4, norm_out=Z(8, D), quant_out=Z(8, D, dtype=U8)),
        ValueError,
        "quant_out must hold",
    ),
    (8, dict(GROUP, block_quant_group_size=None), ValueError, "block_quant_group_size"),
    (8, dict(GROUP, scale_out=Z(2, 8, dtype=I32).t()), ValueError, "strides"),
    (8, dict(GROUP, scale_out=Z(1, 8, dtype=F32).t()), ValueError, "int32"),
    (8, dict(GROUP, scale_out=Z(8, 1, dtype=I32)[:7]), ValueError, r"shape \(8, 1\)"),
    (9, dict(GROUP, block_quant_group_size=96, norm_out=Z(8, D)), ValueError, "divide"),
    (6, {}, ValueError, "moe_reduction_device_num_experts"),
    (6, MOE6, ValueError, "at least one output"),
    (7, {}, ValueError, "expanded_idx_to_permuted_idx"),
    (
        7,
        {"expanded_idx_to_permuted_idx": Z(8, 2, dtype=torch.int64)},
        TypeError,
        "int32",
    ),
]


@pytest.mark.parametrize("pattern,change,error,match", BAD)
def test_every_check_runs_before_the_launch(ws, dev, pattern, change, error, match):
    t = tensors()
    kw = args_for(pattern if pattern in OUTPUTS else 1, t)
    kw["pattern"] = pattern
    if pattern in (6, 7):
        kw = {
            "input": t["input"],
            "pattern": pattern,
            "residual_in": t["residual_in"],
            "rms_gamma": t["rms_gamma"],
        }
    if pattern in (3, 5, 8, 9):
        kw.pop("norm_out", None)
    kw.update(change)
    with pytest.raises(error, match=match):
        comm.allreduce_fusion(workspace=ws, **kw)
    assert dev.launches == []


def test_unknown_workspace_type_and_destroyed_workspace(ws, dev):
    x = tensors()["input"]
    with pytest.raises(TypeError, match="workspace must come from"):
        comm.allreduce_fusion(x, object(), 0)
    with pytest.raises(TypeError, match="workspace must come from"):
        comm.allreduce_fusion(x, (ws.ipc_handles, ws.workspace_tensor), 0)
    ws.destroy()
    with pytest.raises(ValueError, match="destroyed"):
        comm.allreduce_fusion(x, ws, 0)


# ------------------------------------------------------------------------------------------
# trtllm_allreduce_fusion (positional, deprecated)


def _positional(ws, t, pattern=1, **kw):
    n, d = t["input"].reshape(-1, D).shape
    a = dict(
        allreduce_in=t["input"],
        world_size=W,
        world_rank=0,
        token_num=n,
        hidden_dim=d,
        workspace_ptrs=ws.workspace_tensor,
        launch_with_pdl=False,
        trigger_completion_at_end=True,
        fp32_acc=False,
        pattern_code=pattern,
        use_oneshot=None,
        allreduce_out=None,
        residual_in=t["residual_in"],
        residual_out=t["residual_out"],
        norm_out=t["norm_out"],
        quant_out=None,
        scale_out=None,
        rms_gamma=t["rms_gamma"],
        rms_eps=None,
        scale_factor=None,
        layout_code=None,
    )
    a.update(kw)
    return list(a.values())


def test_trtllm_allreduce_fusion_positional(ws, dev):
    t = tensors()
    args = _positional(ws, t)
    comm.trtllm_allreduce_fusion(*args, metadata=ws.metadata)
    call = dev.launches[-1]
    assert call.rms_eps == 0.0 and call.weight_bias == 0.0 and call.use_oneshot is None
    assert call.norm_out is t["norm_out"]
    flat = {k: v.reshape(-1) for k, v in t.items() if k != "rms_gamma"}
    args = _positional(ws, dict(flat, rms_gamma=t["rms_gamma"]))
    comm.trtllm_allreduce_fusion(*args)  # any shape with token_num * hidden_dim elements
    assert len(dev.launches) == 2


def test_trtllm_allreduce_fusion_metadata_lists_every_problem(ws, dev):
    t = tensors(dtype=torch.float32)
    args = _positional(
        ws, t, world_size=4, token_num=M + 1, pattern=0, allreduce_out=torch.empty(M + 1, D)
    )
    args[0] = torch.zeros(M + 1, D)
    meta = dict(ws.metadata)
    del meta["hidden_dim"]
    with pytest.raises(ValueError) as info:
        comm.trtllm_allreduce_fusion(*args, metadata=meta)
    assert "lacks 'hidden_dim'" in str(info.value) and "tp_size (2)" in str(info.value)
    assert "use_fp32_lamport" in str(info.value)
    meta = dict(ws.metadata)
    with pytest.raises(ValueError, match="(?s)world_size.*capacity.*use_fp32_lamport"):
        comm.trtllm_allreduce_fusion(*args, metadata=meta)
    assert dev.launches == []


# ------------------------------------------------------------------------------------------
# The registered op and torch.compile


def test_op_is_registered_with_mutation_annotations():
    schema = str(torch.ops.fusedcomm.allreduce_fusion.default._schema)
    for name in ("allreduce_out", "residual_out", "norm_out", "quant_out", "scale_out"):
        assert f"!)? {name}" in schema, name


def _launch_reference(call):
    """A CPU stand-in for the kernels: every rank holds the same input."""
    n, d = call.token_num, call.hidden_dim
    x = call.input.reshape(n, d)
    out = allreduce_fusion_reference(
        [x] * call.world_size,
        call.pattern,
        residual_in=call.residual_in.reshape(n, d) if call.residual_in is not None else None,
        rms_gamma=call.rms_gamma,
        rms_eps=call.rms_eps,
        scale_factor=call.scale_factor,
        weight_bias=call.weight_bias,
        fp32_acc=call.fp32_acc,
    )
    for name, value in out.items():
        getattr(call, name).copy_(value.reshape(getattr(call, name).shape))


@pytest.mark.parametrize("pattern", [0, 1, 4, 11])
def test_torch_compile_fullgraph_with_aliasing(ws, dev, monkeypatch, pattern):
    monkeypatch.setattr(_fusion_launch, "launch", _launch_reference)
    torch._dynamo.reset()

    def step(x, residual, gamma, scale):
        x = x * 1  # a producer inside the graph; the norm is written over it (in place)
        if pattern == 0:
            return comm.allreduce_fusion(x, ws, 0) + 0, residual
        q = torch.zeros(x.shape, dtype=torch.float8_e4m3fn)
        sf = torch.ones(x.shape[0], 1)
        out = comm.allreduce_fusion(
            x,
            ws,
            pattern,
            residual_in=residual,
            residual_out=residual,
            norm_out=x,
            quant_out=q,
            scale_out=sf,
            rms_gamma=gamma,
            scale_factor=scale,
            fp32_acc=True,
            launch_with_pdl=True,
        )
        return out.float() + q.float() * sf, residual

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for seed, n in enumerate((8, 5, 3)):  # a new token count: dynamic shapes
        t = tensors(n=n, seed=seed)
        scale = torch.tensor([0.5 + seed], dtype=torch.float32)
        r1, r2 = t["residual_in"].clone(), t["residual_in"].clone()
        got, got_res = compiled(t["input"], r1, t["rms_gamma"], scale)
        want, want_res = step(t["input"], r2, t["rms_gamma"], scale)
        assert torch.equal(got, want) and torch.equal(got_res, want_res)
        assert torch.equal(r1, r2) and got_res is r1  # residual_out updated in place
        ref = allreduce_fusion_reference(
            [t["input"]] * W,
            pattern,
            residual_in=t["residual_in"],
            rms_gamma=t["rms_gamma"],
            scale_factor=scale,
        )
        if pattern == 0:
            assert torch.equal(got, ref["allreduce_out"])
            continue
        assert torch.equal(got_res, ref["residual_out"])
        if pattern == 1:
            assert torch.equal(got, ref["norm_out"].float())
