"""The fused all-reduce references against hand-computed values (CPU only)."""

import pytest
import torch

from fusedcomm.enums import AllReduceFusionPattern as P
from fusedcomm.reference.fusion import (
    allreduce_fusion_reference,
    fp8_e4m3,
    fusion_all_reduce,
    quantize_fp8_dynamic,
    quantize_fp8_static,
    residual_rms_norm,
)

MIN_SCALE = torch.tensor(2.0**-9, dtype=torch.float32) / 448


def _f32(values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize(
    "x,expected",
    [
        (1.0625, 1.0),  # tie between 1.0 and 1.125: even mantissa wins
        (1.1875, 1.25),  # tie between 1.125 and 1.25
        (17.0, 16.0),  # tie at step 2
        (19.0, 20.0),
        (-1.0625, -1.0),
        (448.0, 448.0),  # largest finite
        (464.0, 448.0),  # tie towards an unrepresentable 480: saturates
        (500.0, 448.0),
        (1e9, 448.0),
        (-1e9, -448.0),
        (float("inf"), 448.0),
        (2.0**-10, 0.0),  # half the smallest subnormal: tie to zero
        (3 * 2.0**-10, 2.0**-8),  # 1.5 subnormal steps: tie to the even step (2)
        (2.0**-9, 2.0**-9),
    ],
)
def test_fp8_saturating_round_to_nearest_even(x, expected):
    assert fp8_e4m3(_f32([x])).float().item() == expected


def test_fp8_keeps_nan_and_negative_zero():
    q = fp8_e4m3(_f32([float("nan"), -0.0])).float()
    assert torch.isnan(q[0]) and q[1].item() == 0 and torch.signbit(q[1])


@pytest.mark.parametrize(
    "scale,y,expected",
    [
        (2.0, [1.0, 2.0, -3.0, 0.0], [0.5, 1.0, -1.5, 0.0]),
        (3.0, [3.0, 6.0], [1.0, 2.0]),  # 3 * fp32(1/3) = 1.00000003 rounds to 1
        (1.0, [1000.0, -1000.0], [448.0, -448.0]),
        (0.5, [300.0], [448.0]),  # 600 saturates
    ],
)
def test_static_fp8_multiplies_by_the_fp32_reciprocal(scale, y, expected):
    for s in (scale, _f32([scale]), _f32([scale, 99.0])):  # float, tensor, first element
        assert quantize_fp8_static(_f32(y), s).float().tolist() == expected


def test_static_fp8_uses_reciprocal_not_division():
    # 2.734375 / 7 is exactly the e4m3 tie 0.390625 (-> 0.375), while 2.734375 * fp32(1/7)
    # lands just above it (-> 0.40625): the kernel multiplies by the fp32 reciprocal.
    assert quantize_fp8_static(_f32([2.734375]), 7.0).float().item() == 0.40625
    assert fp8_e4m3(_f32([2.734375]) / 7).float().item() == 0.375


def test_dynamic_fp8_per_token_scales():
    y = _f32(
        [
            [896.0, 1.0, -896.0, 0.0],  # amax 896: scale 2
            [0.0, 0.0, 0.0, 0.0],  # zero row: the minimum scale, zeros
            [2.0**-20, 0.0, -(2.0**-20), 0.0],  # tiny amax: the minimum scale again
            [-0.0, 3.0, 1.5, 0.75],
        ]
    )  # amax 3
    q, scale = quantize_fp8_dynamic(y.to(torch.bfloat16))
    assert scale.shape == (4, 1) and scale.dtype == torch.float32
    assert scale[0].item() == 2.0
    assert scale[1].item() == MIN_SCALE.item() and scale[2].item() == MIN_SCALE.item()
    assert scale[3].item() == (_f32([3.0]) / 448).item()
    assert q[0].float().tolist() == [448.0, 0.5, -448.0, 0.0]
    assert q[1].float().tolist() == [0.0] * 4
    # 2^-20 / (2^-9 / 448) = 448 * 2^-11 = 0.21875, exactly representable
    assert q[2].float().tolist() == [0.21875, 0.0, -0.21875, 0.0]
    assert q[3].float().tolist() == [0.0, 448.0, 224.0, 112.0]


def test_dynamic_fp8_divides_by_the_scale():
    y = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    q, scale = quantize_fp8_dynamic(y)
    expected = fp8_e4m3((y / scale).clamp(-448, 448))
    assert torch.equal(q.float(), expected.float())
    assert torch.equal(scale, (y.abs().amax(-1, keepdim=True) / 448).clamp(min=MIN_SCALE))


def test_residual_rms_norm_exact_case():
    reduced = torch.ones(2, 4, dtype=torch.bfloat16)
    residual = torch.ones(2, 4, dtype=torch.bfloat16)
    gamma = torch.tensor([0.0, 1.0, -0.5, 2.0], dtype=torch.bfloat16)
    # p = 2 everywhere; ms = 4; rstd = 0.5 (eps 0); y = p * rstd * (bias + gamma)
    res, y = residual_rms_norm(reduced, residual, gamma, 0.0)
    assert res.tolist() == [[2.0] * 4] * 2 and res.dtype == torch.bfloat16
    assert y.tolist() == [[0.0, 1.0, -0.5, 2.0]] * 2
    _, y_gemma = residual_rms_norm(reduced, residual, gamma, 0.0, weight_bias=1.0)
    assert y_gemma.tolist() == [[1.0, 2.0, 0.5, 3.0]] * 2


def test_residual_is_rounded_before_the_norm():
    # 1 + 2^-8 is a tie in bfloat16 (ulp 2^-7 at 1): it rounds to 1, and the norm sees 1.
    reduced = torch.full((1, 8), 1.0, dtype=torch.bfloat16)
    residual = torch.full((1, 8), 2.0**-8, dtype=torch.bfloat16)
    gamma = torch.ones(8, dtype=torch.bfloat16)
    res, y = residual_rms_norm(reduced, residual, gamma, 0.0)
    assert res.float().unique().tolist() == [1.0]
    assert y.float().unique().tolist() == [1.0]


def test_rms_norm_epsilon_and_fp32_statistics():
    p = torch.tensor([[3.0, 4.0]], dtype=torch.float32)
    gamma = torch.ones(2)
    _, y = residual_rms_norm(p, torch.zeros_like(p), gamma, 0.5)
    rstd = torch.rsqrt(_f32([(9.0 + 16.0) / 2 + 0.5]))
    assert torch.equal(y, p * rstd)


def test_all_reduce_sanitises_negative_zero():
    zeros = [torch.full((4,), -0.0, dtype=torch.float16) for _ in range(3)]
    for acc in (True, False):
        s = fusion_all_reduce(zeros, fp32_acc=acc)
        assert not torch.signbit(s).any()


def test_all_reduce_fp32_accumulation_versus_pairwise():
    x = [torch.tensor([v], dtype=torch.bfloat16) for v in (1.0, 2.0**-8, 2.0**-8)]
    assert fusion_all_reduce(x, fp32_acc=True).item() == 1.0 + 2.0**-7  # one rounding
    assert fusion_all_reduce(x, fp32_acc=False).item() == 1.0  # two ties to even
    # rank order matters when rounding in T: the same values, another order
    assert fusion_all_reduce(x[1:] + x[:1], fp32_acc=False).item() == 1.0 + 2.0**-7


def test_all_reduce_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="differs"):
        fusion_all_reduce([torch.zeros(4), torch.zeros(5)])
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        fusion_all_reduce([torch.zeros(4, dtype=torch.int32)])
    with pytest.raises(ValueError, match="non-empty"):
        fusion_all_reduce([])


@pytest.mark.parametrize(
    "pattern,keys",
    [
        (P.kAllReduce, {"allreduce_out"}),
        (P.kARResidualRMSNorm, {"residual_out", "norm_out"}),
        (P.kARResidualRMSNormFP8Quant, {"residual_out", "quant_out"}),
        (P.kARResidualRMSNormOutFP8Quant, {"residual_out", "norm_out", "quant_out"}),
        (P.kARResidualRMSNormDynamicFP8Quant, {"residual_out", "quant_out", "scale_out"}),
        (
            P.kARResidualRMSNormOutDynamicFP8Quant,
            {"residual_out", "norm_out", "quant_out", "scale_out"},
        ),
    ],
)
def test_pattern_reference_composes_the_steps(pattern, keys):
    gen = torch.Generator().manual_seed(pattern)
    inputs = [torch.randn(5, 64, generator=gen).to(torch.float16) for _ in range(4)]
    residual = torch.randn(5, 64, generator=gen).to(torch.float16)
    gamma = torch.randn(64, generator=gen).to(torch.float16)
    out = allreduce_fusion_reference(
        inputs,
        pattern,
        residual_in=residual,
        rms_gamma=gamma,
        rms_eps=1e-5,
        scale_factor=0.25,
        weight_bias=1.0,
    )
    assert set(out) == keys
    s = fusion_all_reduce(inputs)
    if pattern == P.kAllReduce:
        assert torch.equal(out["allreduce_out"], s)
        return
    res, y = residual_rms_norm(s, residual, gamma, 1e-5, 1.0)
    assert torch.equal(out["residual_out"], res)
    if "norm_out" in keys:
        assert torch.equal(out["norm_out"], y)
    if pattern in (P.kARResidualRMSNormFP8Quant, P.kARResidualRMSNormOutFP8Quant):
        assert torch.equal(out["quant_out"].float(), quantize_fp8_static(y, 0.25).float())
    if "scale_out" in keys:
        q, scale = quantize_fp8_dynamic(y)
        assert torch.equal(out["quant_out"].float(), q.float())
        assert torch.equal(out["scale_out"], scale)


def test_pattern_reference_refuses_what_it_does_not_cover():
    x = [torch.zeros(1, 16)]
    with pytest.raises(NotImplementedError, match="kARResidualRMSNormFP4Quant"):
        allreduce_fusion_reference(x, P.kARResidualRMSNormFP4Quant)
    with pytest.raises(ValueError, match="residual_in and rms_gamma"):
        allreduce_fusion_reference(x, P.kARResidualRMSNorm)
    with pytest.raises(ValueError, match="scale_factor"):
        allreduce_fusion_reference(
            x, P.kARResidualRMSNormFP8Quant, residual_in=x[0], rms_gamma=torch.ones(16)
        )
