"""The MoE fusion frontends on CPU (launch faked): every argument check before the launch, the
MoeFusionCall the kernels get, the unified API's patterns 6 and 7, torch.compile."""

import secrets
import struct

import pytest
import torch

import fusedcomm as comm
import fusion_fakes
from fusedcomm.enums import MAX_COMM_SIZE
from fusedcomm.ops import _fusion_launch
from fusedcomm.ops import moe_fusion as mf
from fusedcomm.reference import moe_allreduce_fusion_reference
from fusion_fakes import BF16, make_ws

dev = fusion_fakes.dev  # the fixture (the unified API's workspace)
F16 = torch.float16
W, N, D, E, K, PROWS = 2, 4, 64, 3, 2, 10


def fp32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


@pytest.fixture
def gen():
    seed = secrets.randbits(31)
    print(f"generator seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def calls(monkeypatch):
    """Every MoeFusionCall that reaches the launch."""
    seen = []
    monkeypatch.setattr(mf, "_launch_moe", seen.append)
    return seen


def _act(gen, *shape, dtype=BF16):
    return (torch.randn(shape, generator=gen) + 3.0).to(dtype)  # non-zero, finite


def reduction_args(gen, dtype=BF16, n=N, d=D, **over):
    kw = {
        "world_size": W,
        "world_rank": 1,
        "token_num": n,
        "hidden_dim": d,
        "workspace_ptrs": torch.arange(1, 3 * W + 2, dtype=torch.int64),
        "launch_with_pdl": True,
        "residual_in": _act(gen, n, d, dtype=dtype),
        "rms_gamma": _act(gen, d, dtype=dtype),
        "rms_eps": 1e-5,
        "scale_factor": 0.3,
        "moe_reduction_device_num_experts": E,
        "moe_reduction_scale_input": torch.rand(E, n, generator=gen) + 0.5,
        "moe_reduction_active_experts_token_input": _act(gen, E, n, d, dtype=dtype),
        "moe_reduction_token_input": _act(gen, n, d, dtype=dtype),
        "layout_code": None,
        "moe_allreduce_out": torch.empty(n, d, dtype=dtype),
        "residual_out": torch.empty(n, d, dtype=dtype),
        "norm_out": torch.empty(n, d, dtype=dtype),
        "quant_out": None,
        "scale_out": None,
    }
    return {**kw, **over}


def finalize_args(gen, dtype=BF16, **over):
    idx = torch.randperm(PROWS, generator=gen)[: N * K].reshape(N, K).to(torch.int32)
    idx[0, 1] = -1
    kw = {
        "allreduce_in": _act(gen, PROWS, D, dtype=dtype),
        "residual_in": _act(gen, N, D, dtype=dtype),
        "norm_weight": _act(gen, D, dtype=dtype),
        "expanded_idx_to_permuted_idx": idx,
        "norm_out": torch.empty(N, D, dtype=dtype),
        "residual_out": torch.empty(N, D, dtype=dtype),
        "quant_out": None,
        "scale_out": None,
        "workspace_ptrs": torch.arange(1, 3 * W + 2, dtype=torch.int64),
        "launch_with_pdl": False,
        "world_rank": 0,
        "world_size": W,
        "eps": 1e-6,
        "shared_expert_output": _act(gen, N, D, dtype=dtype),
        "expert_scale_factor": _act(gen, N, K, dtype=dtype),
        "routed_scaling_factor": 2.5,
    }
    return {**kw, **over}


def nvfp4(n=N, d=D, layout_bytes=512):
    return {
        "quant_out": torch.empty(n, d // 2, dtype=torch.uint8),
        "scale_out": torch.empty(layout_bytes, dtype=torch.uint8),
    }


def _fields(call):
    return {f: getattr(call, f) for f in mf.MoeFusionCall.__dataclass_fields__}


# ------------------------------------------------------------------------------------------
# The MoeFusionCall of valid calls


def test_reduction_call_is_normalised(gen, calls):
    kw = reduction_args(gen, **nvfp4(), layout_code=comm.QuantizationSFLayout.LINEAR)
    kw["scale_out"] = torch.empty(N * D // 16, dtype=torch.uint8)  # LINEAR: exactly N * D / 16
    assert comm.trtllm_moe_allreduce_fusion(**kw) is None
    (call,) = calls
    got = _fields(call)
    same = {
        "workspace_ptrs": "workspace_ptrs",
        "residual_in": "residual_in",
        "rms_gamma": "rms_gamma",
        "norm_out": "norm_out",
        "residual_out": "residual_out",
        "allreduce_out": "moe_allreduce_out",
        "quant_out": "quant_out",
        "scale_out": "scale_out",
        "scale_input": "moe_reduction_scale_input",
        "active_experts_token_input": "moe_reduction_active_experts_token_input",
        "token_input": "moe_reduction_token_input",
    }
    for field, arg in same.items():
        assert got.pop(field) is kw[arg], field
    assert got == {
        "pattern": 6,
        "world_size": W,
        "rank": 1,
        "token_num": N,
        "hidden_dim": D,
        "launch_with_pdl": True,
        "rms_eps": fp32(1e-5),
        "weight_bias": 0.0,
        "scale_factor": fp32(0.3),
        "layout_code": 2,
        "num_experts": E,
        "allreduce_in": None,
        "expanded_idx_to_permuted_idx": None,
        "expert_scale_factor": None,
        "shared_expert_output": None,
        "routed_scaling_factor": 1.0,
        "top_k": 0,
    }
    assert call.rms_eps != 1e-5  # rounded to float32, what the kernels use


def test_finalize_call_is_normalised(gen, calls):
    kw = finalize_args(gen, dtype=F16)
    kw["allreduce_in"] = kw["allreduce_in"][: N * K].reshape(N, K, D)  # [N, top_k, D] is fine
    comm.trtllm_moe_finalize_allreduce_fusion(**kw, weight_bias=1.0)
    (call,) = calls
    got = _fields(call)
    same = {
        "workspace_ptrs": "workspace_ptrs",
        "residual_in": "residual_in",
        "rms_gamma": "norm_weight",
        "norm_out": "norm_out",
        "residual_out": "residual_out",
        "allreduce_in": "allreduce_in",
        "expanded_idx_to_permuted_idx": "expanded_idx_to_permuted_idx",
        "expert_scale_factor": "expert_scale_factor",
        "shared_expert_output": "shared_expert_output",
    }
    for field, arg in same.items():
        assert got.pop(field) is kw[arg], field
    assert got == {
        "pattern": 7,
        "world_size": W,
        "rank": 0,
        "token_num": N,
        "hidden_dim": D,
        "launch_with_pdl": False,
        "rms_eps": fp32(1e-6),
        "weight_bias": 1.0,
        "allreduce_out": None,
        "quant_out": None,
        "scale_out": None,
        "scale_factor": 1.0,  # the keyword's default (the NVFP4 global scale)
        "layout_code": 0,
        "num_experts": 0,
        "scale_input": None,
        "active_experts_token_input": None,
        "token_input": None,
        "routed_scaling_factor": 2.5,
        "top_k": K,
    }


def test_positional_order_is_the_documented_one(gen, calls):
    r = reduction_args(gen)
    comm.trtllm_moe_allreduce_fusion(*r.values(), 0.5)  # dict order is the signature's
    f = finalize_args(gen)
    comm.trtllm_moe_finalize_allreduce_fusion(*f.values(), None, scale_factor=4.0)
    red, fin = calls
    assert (red.rank, red.token_num, red.weight_bias, red.scale_factor) == (1, N, 0.5, fp32(0.3))
    assert red.active_experts_token_input is r["moe_reduction_active_experts_token_input"]
    assert fin.expert_scale_factor is f["expert_scale_factor"] and fin.scale_factor == 4.0
    assert (fin.rank, fin.world_size, fin.routed_scaling_factor) == (0, W, 2.5)


def test_defaults_none_scalars_and_no_routed_scaling(gen, calls):
    comm.trtllm_moe_allreduce_fusion(**reduction_args(gen, rms_eps=None, scale_factor=None))
    kw = finalize_args(gen, eps=None, routed_scaling_factor=None, expert_scale_factor=None)
    comm.trtllm_moe_finalize_allreduce_fusion(**{**kw, "shared_expert_output": None})
    red, fin = calls
    assert (red.rms_eps, red.scale_factor, red.weight_bias) == (0.0, 1.0, 0.0)
    assert (fin.rms_eps, fin.routed_scaling_factor) == (0.0, 1.0)
    assert fin.expert_scale_factor is None and fin.shared_expert_output is None


def test_outputs_may_be_inputs_and_optional_outputs_may_be_none(gen, calls):
    kw = reduction_args(gen, moe_allreduce_out=None)
    kw["residual_out"] = kw["residual_in"]
    comm.trtllm_moe_allreduce_fusion(**kw)
    assert calls[0].residual_out is kw["residual_in"] and calls[0].allreduce_out is None
    comm.trtllm_moe_finalize_allreduce_fusion(**finalize_args(gen, residual_out=None))
    assert calls[1].residual_out is None


def test_no_tokens_means_no_launch(gen, calls):
    kw = reduction_args(gen, n=0)
    comm.trtllm_moe_allreduce_fusion(**kw)
    assert calls == []


def test_index_range_is_the_callers_contract_unless_checked(gen, calls):
    idx = torch.tensor([[0, 9], [-1, 3], [2, 10], [4, 1]], dtype=torch.int32)  # 10 >= PROWS
    comm.trtllm_moe_finalize_allreduce_fusion(
        **finalize_args(gen, expanded_idx_to_permuted_idx=idx)
    )
    assert len(calls) == 1  # not read without check_indices: no device synchronisation
    with pytest.raises(ValueError, match=r"expanded_idx_to_permuted_idx\[2, 1\] \(10\).*0\.\.9"):
        comm.trtllm_moe_finalize_allreduce_fusion(
            **finalize_args(gen, expanded_idx_to_permuted_idx=idx), check_indices=True
        )
    idx[2, 1] = -2
    with pytest.raises(ValueError, match=r"\[2, 1\] \(-2\) must be -1 or a row"):
        comm.trtllm_moe_finalize_allreduce_fusion(
            **finalize_args(gen, expanded_idx_to_permuted_idx=idx), check_indices=True
        )
    idx[2, 1] = 9
    comm.trtllm_moe_finalize_allreduce_fusion(
        **finalize_args(gen, expanded_idx_to_permuted_idx=idx), check_indices=True
    )
    assert len(calls) == 2


def test_launch_goes_to_the_kernel_side(gen, monkeypatch):
    seen = []
    monkeypatch.setattr(_fusion_launch, "launch_moe", seen.append)
    comm.trtllm_moe_allreduce_fusion(**reduction_args(gen))
    comm.trtllm_moe_finalize_allreduce_fusion(**finalize_args(gen))
    assert [c.pattern for c in seen] == [6, 7]
    assert all(isinstance(c, mf.MoeFusionCall) for c in seen)


# ------------------------------------------------------------------------------------------
# Every check runs before the launch


def _shifted(t):
    """``t``'s values in a contiguous tensor whose address is 2 bytes past 16-byte alignment."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


RED = "trtllm_moe_allreduce_fusion: "
REDUCTION_ERRORS = [
    ("residual_in", lambda t: t.float(), TypeError, r"residual_in.dtype \(torch.float32\)"),
    ("residual_in", lambda t: t.tolist(), TypeError, "residual_in must be a Tensor"),
    ("world_size", lambda v: 0, ValueError, r"world_size \(0\) must be >= 1"),
    ("world_size", lambda v: "2", TypeError, "world_size must be an int"),
    ("world_rank", lambda v: 2, ValueError, r"world_rank \(2\) must be < world_size \(2\)"),
    ("token_num", lambda v: -1, ValueError, r"token_num \(-1\) must be >= 0"),
    ("hidden_dim", lambda v: 60, ValueError, r"hidden_dim \(60\) must be a multiple of 8"),
    ("hidden_dim", lambda v: 65544, ValueError, r"hidden_dim \(65544\) must be <= 65536"),
    ("workspace_ptrs", lambda t: t[:-1], ValueError, r"workspace_ptrs must be the int64 .* = 7 entries, got torch.int64 with 6"),
    ("workspace_ptrs", lambda t: t.int(), ValueError, "workspace_ptrs must be the int64 .* got torch.int32 with 7"),
    ("workspace_ptrs", lambda t: t.repeat(2)[::2], ValueError, "workspace_ptrs must be contig"),
    ("workspace_ptrs", _meta, ValueError, "workspace_ptrs is on meta"),
    ("token_num", lambda v: 2**24, ValueError, r"the call does not fit.*4294967296 bytes.*MAX_COMM_SIZE"),
    ("residual_in", lambda t: t[:3], ValueError, r"residual_in must be \[4, 64\]"),
    ("residual_in", lambda t: t.t().contiguous().t(), ValueError, "residual_in must be contig"),
    ("residual_in", _shifted, ValueError, "residual_in must be 16-byte aligned"),
    ("rms_gamma", lambda t: t.float(), TypeError, r"rms_gamma.dtype \(torch.float32\)"),
    ("rms_gamma", lambda t: t[:32], ValueError, r"rms_gamma must be \[64\]"),
    ("norm_out", lambda t: None, ValueError, "norm_out is required"),
    ("norm_out", lambda t: t.half(), TypeError, r"norm_out.dtype \(torch.float16\)"),
    ("norm_out", _meta, ValueError, "norm_out is on meta"),
    ("residual_out", lambda t: t[:, :32], ValueError, "residual_out must be contiguous"),
    ("moe_allreduce_out", lambda t: t.reshape(8, 32), ValueError, r"moe_allreduce_out must be"),
    ("layout_code", lambda v: 3, ValueError, r"layout_code \(3\) must be a Quantization"),
    ("layout_code", lambda v: True, ValueError, r"layout_code \(True\)"),
    ("scale_out", lambda v: torch.empty(512, dtype=torch.uint8), ValueError, "scale_out is given without quant_out"),
    ("quant_out", lambda v: torch.empty(N, D, dtype=torch.uint8), ValueError, "quant_out must hold 128 bytes"),
    ("moe_reduction_device_num_experts", lambda v: 0, ValueError, r"moe_reduction_device_num_experts \(0\) must be >= 1"),
    ("moe_reduction_device_num_experts", lambda v: 3.0, TypeError, "moe_reduction_device_num_experts must be an int"),
    ("moe_reduction_active_experts_token_input", lambda t: t.transpose(0, 1).contiguous(),
     ValueError, r"moe_reduction_active_experts_token_input must be \[3, 4, 64\]"),
    ("moe_reduction_active_experts_token_input", lambda t: t.half(), TypeError, "moe_reduction_active_experts_token_input.dtype"),
    ("moe_reduction_scale_input", lambda t: t.to(BF16), TypeError, r"moe_reduction_scale_input.dtype \(torch.bfloat16\) must be torch.float32"),
    ("moe_reduction_scale_input", lambda t: t.t().contiguous(), ValueError, r"moe_reduction_scale_input must be \[3, 4\]"),
    ("moe_reduction_scale_input", lambda t: t.t().contiguous().t(), ValueError, "moe_reduction_scale_input must be contiguous"),
    ("moe_reduction_token_input", lambda t: t[:2], ValueError, r"moe_reduction_token_input must be \[4, 64\]"),
    ("rms_eps", lambda v: "1e-6", TypeError, "rms_eps must be a float"),
    ("weight_bias", lambda v: True, TypeError, "weight_bias must be a float"),
    ("scale_factor", lambda v: torch.ones(1), TypeError, "scale_factor must be a float"),
    ("launch_with_pdl", lambda v: 1, TypeError, "launch_with_pdl must be a bool"),
]  # fmt: skip


@pytest.mark.parametrize("name,change,error,match", REDUCTION_ERRORS)
def test_reduction_rejects_before_the_launch(gen, calls, name, change, error, match):
    kw = reduction_args(gen, **nvfp4()) if name == "quant_out" else reduction_args(gen)
    kw[name] = change(kw.get(name))
    with pytest.raises(error, match=RED + match):
        comm.trtllm_moe_allreduce_fusion(**kw)
    assert calls == []


@pytest.mark.parametrize(
    "over,match",
    [
        ({"quant_out": None}, "needs at least one output"),
        ({"quant_out": torch.empty(N, D // 2, dtype=torch.uint8)}, "norm_out is required"),
    ],
)
def test_outputs_are_required(gen, calls, over, match):
    kw = reduction_args(gen, moe_allreduce_out=None, residual_out=None, norm_out=None, **over)
    with pytest.raises(ValueError, match=match):
        comm.trtllm_moe_allreduce_fusion(**kw)
    assert calls == []


@pytest.mark.parametrize(
    "d,layout,sf_bytes,match",
    [
        (72, None, 512, r"NVFP4 \(quant_out\) needs hidden_dim \(72\) to be a multiple of 16"),
        (D, None, 511, "scale_out holds 511 bytes; SWIZZLED_128x4 needs 512 for 4 rows of 4"),
        (D, 2, 15, "scale_out holds 15 bytes; LINEAR needs 16"),
        (D, 1, 31, "SWIZZLED_8x4 needs 32"),
        (D, None, None, r"NVFP4 \(quant_out\) needs scale_out"),
    ],
)
def test_nvfp4_outputs(gen, calls, d, layout, sf_bytes, match):
    out = nvfp4(d=d, layout_bytes=sf_bytes or 1)
    if sf_bytes is None:
        out["scale_out"] = None
    kw = reduction_args(gen, d=d, layout_code=layout, **out)
    with pytest.raises(ValueError, match=match):
        comm.trtllm_moe_allreduce_fusion(**kw)
    assert calls == []
    out["scale_out"] = torch.empty(sf_bytes + 1 if sf_bytes else 512, dtype=torch.uint8)
    if d % 16 == 0:  # one byte more than the layout needs is fine
        comm.trtllm_moe_allreduce_fusion(**reduction_args(gen, d=d, layout_code=layout, **out))
        assert calls[0].scale_out is out["scale_out"]


FIN = "trtllm_moe_finalize_allreduce_fusion: "
FINALIZE_ERRORS = [
    ("allreduce_in", lambda t: t.float(), TypeError, r"allreduce_in.dtype \(torch.float32\)"),
    ("residual_in", lambda t: t.half(), TypeError, "residual_in.dtype .* the activations'"),
    ("residual_in", lambda t: t.reshape(-1), ValueError, "residual_in must be 2-D"),
    ("world_rank", lambda v: -1, ValueError, r"world_rank \(-1\) must be >= 0"),
    ("workspace_ptrs", lambda t: t[:5], ValueError, "workspace_ptrs must be the int64 pointer table"),
    ("norm_weight", lambda t: t.float(), TypeError, "norm_weight.dtype"),
    ("norm_weight", lambda t: t[:8], ValueError, r"norm_weight must be \[64\]"),
    ("allreduce_in", lambda t: t[:, :32].contiguous(), ValueError, r"allreduce_in must be \[P"),
    ("allreduce_in", lambda t: t.t().contiguous().t(), ValueError, "allreduce_in must be contig"),
    ("allreduce_in", _shifted, ValueError, "allreduce_in must be 16-byte aligned"),
    ("expanded_idx_to_permuted_idx", lambda t: t.tolist(), TypeError, "expanded_idx_to_permuted_idx must be a Tensor"),
    ("expanded_idx_to_permuted_idx", lambda t: t.long(), TypeError, r"expanded_idx_to_permuted_idx.dtype \(torch.int64\) must be torch.int32"),
    ("expanded_idx_to_permuted_idx", lambda t: t[:3], ValueError, r"expanded_idx_to_permuted_idx must be \[token_num, top_k\] = \[4, "),
    ("expanded_idx_to_permuted_idx", lambda t: t[:, :0], ValueError, r"expanded_idx_to_permuted_idx must be .*top_k >= 1.*\(4, 0\)"),
    ("expanded_idx_to_permuted_idx", lambda t: t.t().contiguous().t(), ValueError, "expanded_idx_to_permuted_idx must be contig"),
    ("expert_scale_factor", lambda t: t.float(), TypeError, "expert_scale_factor.dtype"),
    ("expert_scale_factor", lambda t: t[:, :1].contiguous(), ValueError, r"expert_scale_factor must be \[4, 2\]"),
    ("shared_expert_output", lambda t: t.half(), TypeError, "shared_expert_output.dtype"),
    ("shared_expert_output", lambda t: t[:1], ValueError, r"shared_expert_output must be \[4"),
    ("routed_scaling_factor", lambda v: "2", TypeError, "routed_scaling_factor must be a float"),
    ("eps", lambda v: [1e-6], TypeError, "eps must be a float"),
    ("norm_out", lambda t: None, ValueError, "norm_out is required"),
    ("launch_with_pdl", lambda v: None, TypeError, "launch_with_pdl must be a bool"),
]  # fmt: skip


@pytest.mark.parametrize("name,change,error,match", FINALIZE_ERRORS)
def test_finalize_rejects_before_the_launch(gen, calls, name, change, error, match):
    kw = finalize_args(gen)
    kw[name] = change(kw[name])
    with pytest.raises(error, match=FIN + match):
        comm.trtllm_moe_finalize_allreduce_fusion(**kw)
    assert calls == []


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({"scale_factor": "1"}, TypeError, "scale_factor must be a float"),
        ({"layout_code": 7}, ValueError, r"layout_code \(7\)"),
        ({"check_indices": 1}, TypeError, "check_indices must be a bool"),
    ],
)
def test_finalize_keywords(gen, calls, kw, error, match):
    with pytest.raises(error, match=FIN + match):
        comm.trtllm_moe_finalize_allreduce_fusion(**finalize_args(gen), **kw)
    assert calls == []


def test_finalize_capacity_is_checked_without_allocating(calls):
    n, d = 2**20, 1024
    meta = {"device": "meta", "dtype": BF16}
    kw = {
        "allreduce_in": torch.empty(n, d, **meta),
        "residual_in": torch.empty(n, d, **meta),
        "workspace_ptrs": torch.empty(3 * W + 1, dtype=torch.int64, device="meta"),
    }
    args = {**finalize_args(torch.Generator().manual_seed(0)), **kw}
    need = n * d * 2 * W
    assert need > MAX_COMM_SIZE
    with pytest.raises(ValueError, match=FIN + f"the call does not fit the workspace.*{need}"):
        comm.trtllm_moe_finalize_allreduce_fusion(**args)
    assert calls == []


# ------------------------------------------------------------------------------------------
# The unified API's patterns 6 and 7


@pytest.fixture
def ws(dev):
    w = make_ws()  # world 2, rank 0, 64 tokens of 256, bfloat16
    yield w
    w.destroy()


def unified(gen, pattern, n=N, d=256, **over):
    kw = {"residual_in": _act(gen, n, d), "rms_gamma": _act(gen, d)}
    if pattern == 6:
        kw.update(
            moe_reduction_device_num_experts=E,
            moe_reduction_scale_input=torch.rand(E, n, generator=gen),
            moe_reduction_active_experts_token_input=_act(gen, E, n, d),
            moe_reduction_token_input=_act(gen, n, d),
            norm_out=torch.empty(n, d, dtype=BF16),
        )
        return _act(gen, n, d), {**kw, **over}
    kw.update(expanded_idx_to_permuted_idx=torch.tensor([[1, -1]] * n, dtype=torch.int32))
    return _act(gen, 3, d), {**kw, **over}


@pytest.mark.parametrize(
    "pattern,missing",
    [(6, n) for n in mf._UNIFIED_NEEDS[6]] + [(7, n) for n in mf._UNIFIED_NEEDS[7]],
)
def test_unified_requires_each_argument(gen, ws, calls, pattern, missing):
    x, kw = unified(gen, pattern, **{missing: None})
    with pytest.raises(ValueError, match=rf"allreduce_fusion: .*\({pattern}\) needs {missing}$"):
        mf.moe_unified_call("allreduce_fusion", x, ws, pattern, **kw)
    assert calls == []


@pytest.mark.parametrize("scale,expected", [(torch.full((1,), 3.0), 1.0), (None, 1.0), (3, 3.0)])
def test_unified_reduction(gen, ws, calls, scale, expected):
    x, kw = unified(gen, 6, output=torch.empty(N, 256, dtype=BF16), scale_factor=scale)
    out = mf.moe_unified_call("allreduce_fusion", x, ws, 6, fp32_acc=True, use_oneshot=False, **kw)
    (call,) = calls
    assert out is kw["norm_out"] is call.norm_out
    assert call.allreduce_out is kw["output"] and call.scale_factor == expected
    assert (call.world_size, call.rank, call.token_num, call.hidden_dim) == (W, 0, N, 256)
    assert call.workspace_ptrs is ws.workspace_tensor and call.rms_eps == fp32(1e-6)


def test_unified_finalize_allocates_its_outputs(gen, ws, calls):
    x, kw = unified(gen, 7, expert_scale_factor=_act(gen, N, 2), scale_factor=0.25)
    out = mf.moe_unified_call("allreduce_fusion", x, ws, 7, output=torch.empty(1), **kw)
    (call,) = calls
    assert out is call.norm_out and out.shape == (N, 256) and out.dtype == BF16
    assert call.residual_out.shape == (N, 256) and call.residual_out is not out
    assert call.allreduce_in is x and call.routed_scaling_factor == 1.0 and call.top_k == 2
    assert call.scale_factor == 0.25 and call.expert_scale_factor is kw["expert_scale_factor"]
    given = torch.empty(N, 256, dtype=BF16)
    assert mf.moe_unified_call("allreduce_fusion", x, ws, 7, norm_out=given, **kw) is given


@pytest.mark.parametrize(
    "pattern,change,error,match",
    [
        (7, {"input": torch.ones(3, 256)}, TypeError, r"input.dtype \(torch.float32\)"),
        (6, {"input": None}, TypeError, "input must be a Tensor"),
        (
            6,
            {"norm_out": None, "residual_out": torch.empty(N, 256, dtype=BF16)},
            ValueError,
            "norm_out is required",
        ),
        (
            6,
            {"residual_in": torch.ones(N, 256, dtype=BF16)[None]},
            ValueError,
            "residual_in must be 2-D",
        ),
        (7, {"use_oneshot": 1}, TypeError, "use_oneshot must be a bool"),
        (6, {"trigger_completion_at_end": None}, TypeError, "trigger_completion_at_end"),
        (5, {}, ValueError, r"kARResidualRMSNormOutFP4Quant \(5\) is not a MoE fusion"),
    ],
)
def test_unified_rejects_before_the_launch(gen, ws, calls, pattern, change, error, match):
    x, kw = unified(gen, 6 if pattern == 5 else pattern)
    x = change.pop("input", x)
    with pytest.raises(error, match="allreduce_fusion: " + match):
        mf.moe_unified_call("allreduce_fusion", x, ws, pattern, **{**kw, **change})
    assert calls == []


@pytest.mark.parametrize("pattern", [6, 7])
def test_unified_checks_the_workspace_capacity(gen, ws, calls, pattern):
    x, kw = unified(gen, pattern, n=65)  # 65 tokens of 256 > the workspace's 64
    with pytest.raises(ValueError, match="does not fit the workspace: .*capacity"):
        mf.moe_unified_call("allreduce_fusion", x, ws, pattern, **kw)
    assert calls == []


# ------------------------------------------------------------------------------------------
# The registered op and torch.compile


def test_op_is_registered_with_mutation_annotations():
    schema = str(torch.ops.fusedcomm.moe_allreduce_fusion.default._schema)
    assert "Tensor(a!) norm_out" in schema
    for name in ("residual_out", "allreduce_out", "quant_out", "scale_out"):
        assert f"!)? {name}" in schema, name
    fields = list(mf.MoeFusionCall.__dataclass_fields__)
    args = [a.name for a in torch.ops.fusedcomm.moe_allreduce_fusion.default._schema.arguments]
    assert [f.replace("rank", "world_rank") for f in fields] == args


def _launch_reference(call):
    """A CPU stand-in for the kernels: every rank holds this rank's prologue inputs."""
    kw = {}
    if call.pattern == 6:
        kw = {
            "active_experts_token_input": [call.active_experts_token_input] * call.world_size,
            "scale_input": [call.scale_input] * call.world_size,
            "token_input": [call.token_input] * call.world_size,
        }
    out = moe_allreduce_fusion_reference(
        call.pattern, call.residual_in, call.rms_gamma, rms_eps=call.rms_eps, **kw
    )
    call.norm_out.copy_(out["norm_out"])
    if call.residual_out is not None:
        call.residual_out.copy_(out["residual_out"])


def test_torch_compile_fullgraph_reduction(gen, monkeypatch):
    monkeypatch.setattr(_fusion_launch, "launch_moe", _launch_reference)
    torch._dynamo.reset()
    ptrs = torch.arange(1, 3 * W + 2, dtype=torch.int64)

    def step(x, scales, tok, residual, gamma):
        norm = torch.empty_like(residual)
        comm.trtllm_moe_allreduce_fusion(
            W, 0, residual.shape[0], residual.shape[1], ptrs, False, residual, gamma, 1e-6,
            1.0, x.shape[0], scales, x, tok, None, None, residual, norm, None, None,
        )  # fmt: skip
        return norm.float() * 2, residual

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for n in (4, 3):
        a = reduction_args(gen, n=n)
        inputs = [a[k] for k in ("moe_reduction_active_experts_token_input",)]
        inputs += [a["moe_reduction_scale_input"], a["moe_reduction_token_input"]]
        r1, r2 = a["residual_in"].clone(), a["residual_in"].clone()
        got, got_res = compiled(*inputs, r1, a["rms_gamma"])
        want, want_res = step(*inputs, r2, a["rms_gamma"])
        assert torch.equal(got, want) and got_res is r1 and torch.equal(r1, r2)
        ref = moe_allreduce_fusion_reference(
            6, a["residual_in"], a["rms_gamma"], active_experts_token_input=[inputs[0]] * W,
            scale_input=[inputs[1]] * W, token_input=[inputs[2]] * W,
        )  # fmt: skip
        assert torch.equal(r1, ref["residual_out"]) and not torch.equal(r1, a["residual_in"])
