"""The MoE fusion references against hand-computed values and a scalar oracle (CPU only)."""

import secrets

import pytest
import torch

from fusedcomm.enums import AllReduceFusionPattern as P
from fusedcomm.enums import QuantizationSFLayout as L
from fusedcomm.reference import (
    fusion_all_reduce,
    moe_allreduce_fusion_reference,
    moe_finalize,
    moe_reduction,
)

BF16, F16 = torch.bfloat16, torch.float16
DTYPES = [BF16, F16]
# Half a unit in the last place at 1.0: 1 + HALF_ULP is a tie that rounds back to 1.0.
HALF_ULP = {BF16: 2.0**-8, F16: 2.0**-11}


@pytest.fixture
def gen():
    seed = secrets.randbits(31)
    print(f"generator seed {seed}")  # shown by pytest when the test fails
    return torch.Generator().manual_seed(seed)


def _values(gen, shape, dtype, scale=1.0):
    """Random non-zero values of ``dtype`` (normal, times ``scale``)."""
    x = torch.randn(shape, generator=gen) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x).to(dtype)


def _rd(v: float, dtype) -> float:
    """A real number (given exactly as a double) rounded to fp32, then to ``dtype``."""
    return torch.tensor(v, dtype=torch.float64).to(torch.float32).to(dtype).item()


def _oracle_reduction(x, s, tok):
    """Scalar loops over every element; an independent spelling of the pattern 6 prologue."""
    e_num, n, d = x.shape
    out = torch.empty(n, d, dtype=x.dtype)
    for t in range(n):
        for j in range(d):
            acc = 0.0
            for e in range(e_num):
                acc = _rd(acc + _rd(x[e, t, j].item() * s[e, t].item(), x.dtype), x.dtype)
            out[t, j] = _rd(acc + tok[t, j].item(), x.dtype)
    return out


def _oracle_finalize(rows, idx, w, rsf, shared):
    n, top_k = idx.shape
    d = rows.shape[1]
    out = torch.empty(n, d, dtype=rows.dtype)
    rsf32 = torch.tensor(rsf, dtype=torch.float32).item() if rsf is not None else 1.0
    for t in range(n):
        for j in range(d):
            acc = 0.0
            for k in range(top_k):
                p = int(idx[t, k])
                if p == -1:
                    continue
                term = rows[p, j].item()
                if w is not None:
                    term = _rd(term * w[t, k].item(), rows.dtype)
                acc = _rd(acc + term, rows.dtype)
            if rsf32 != 1.0:
                acc = _rd(acc * rsf32, rows.dtype)
            if shared is not None:
                acc = _rd(acc + shared[t, j].item(), rows.dtype)
            out[t, j] = acc
    return out


# ------------------------------------------------------------------------------------------
# moe_reduction (pattern 6 prologue)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduction_accumulates_in_t_not_fp32(dtype):
    h = HALF_ULP[dtype]
    e, n, d = 2, 2, 16
    x = torch.empty(e, n, d)
    s = torch.ones(e, n)
    tok = torch.empty(n, d)
    # token 0: 1 + h + h. In T each addition is a tie back to 1.0; an fp32 sum would give
    # 1 + 2h = 1 + ulp, which T represents.
    x[0, 0], x[1, 0], tok[0] = 1.0, h, h
    # token 1: the second product, 1 * h * (1 + h/2) (an fp32 scale), is rounded to T (h)
    # before it is added, so 1 + h is a tie kept at 1.0; unrounded, 1 + h + h^2/2 would round
    # up to 1 + 2h. Then + 0.5.
    x[0, 1], x[1, 1], tok[1] = 1.0, 1.0, 0.5
    s[1, 1] = h * (1.0 + h / 2)
    got = moe_reduction(x.to(dtype), s, tok.to(dtype))
    assert got.dtype == dtype and got.shape == (n, d)
    assert torch.all(got[0] == 1.0)
    assert torch.all(got[1] == 1.5)
    fp32_sum = ((x[0] * s[0, :, None] + x[1] * s[1, :, None]) + tok).to(dtype)
    assert torch.all(fp32_sum[0] == 1.0 + 2 * h) and not torch.equal(got, fp32_sum)


def test_reduction_hand_values_with_scales():
    x = torch.tensor([[[3.0] * 16, [-2.0] * 16]], dtype=BF16)  # E = 1, N = 2
    x = torch.cat([x, torch.tensor([[[-1.0] * 16, [8.0] * 16]], dtype=BF16)])  # E = 2
    s = torch.tensor([[0.5, 0.25], [0.25, 0.125]])
    tok = torch.tensor([[4.0] * 16, [1.0] * 16], dtype=BF16)
    got = moe_reduction(x, s, tok)
    # token 0: 3 * .5 - 1 * .25 + 4 = 5.25; token 1: -2 * .25 + 8 * .125 + 1 = 1.5
    assert torch.equal(got, torch.tensor([[5.25] * 16, [1.5] * 16], dtype=BF16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts", [1, 3, 8])
def test_reduction_matches_the_scalar_oracle(gen, dtype, experts):
    n, d = 3, 16
    x = _values(gen, (experts, n, d), dtype, 4.0)
    s = torch.rand(experts, n, generator=gen) + 0.1
    tok = _values(gen, (n, d), dtype)
    got = moe_reduction(x, s, tok)
    assert torch.equal(got, _oracle_reduction(x, s, tok))


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"x": lambda t: t.float()}, TypeError, "active_experts_token_input.dtype"),
        ({"tok": lambda t: t.half()}, TypeError, "token_input.dtype"),
        ({"s": lambda t: t.to(BF16)}, TypeError, "scale_input must be a float32"),
        ({"s": lambda t: t.t().contiguous()}, ValueError, r"scale_input must have shape \(2, 3\)"),
        ({"tok": lambda t: t[:2]}, ValueError, r"token_input must have shape \(3, 16\)"),
        ({"x": lambda t: t.reshape(6, 16)}, ValueError, r"must be \[E, N, D\]"),
    ],
)
def test_reduction_rejects_bad_arguments(gen, change, error, match):
    args = {
        "x": _values(gen, (2, 3, 16), BF16),
        "s": torch.rand(2, 3, generator=gen),
        "tok": _values(gen, (3, 16), BF16),
    }
    for key, fn in change.items():
        args[key] = fn(args[key])
    with pytest.raises(error, match=match):
        moe_reduction(args["x"], args["s"], args["tok"])


# ------------------------------------------------------------------------------------------
# moe_finalize (pattern 7 prologue)


@pytest.mark.parametrize("dtype", DTYPES)
def test_finalize_accumulates_in_t_and_skips_minus_one(dtype):
    h = HALF_ULP[dtype]
    d = 16
    rows = torch.tensor([[1.0], [h], [2.0], [1e4]]).expand(4, d).to(dtype).contiguous()
    # token 0: rows 0, 1 and the shared h: 1 + h + h stays 1.0 in T (1 + ulp in fp32).
    # token 1: -1 must not read the last row (1e4), as a Python index -1 would.
    idx = torch.tensor([[0, 1], [-1, 2]], dtype=torch.int32)
    shared = torch.full((2, d), h).to(dtype)
    got = moe_finalize(rows, idx, shared_expert_output=shared)
    assert got.dtype == dtype
    assert torch.all(got[0] == 1.0)
    assert torch.all(got[1] == _rd(2.0 + h, dtype))
    all_skipped = moe_finalize(rows, torch.full((2, 3), -1, dtype=torch.int32))
    assert torch.equal(all_skipped, torch.zeros(2, d, dtype=dtype))
    assert not torch.any(torch.signbit(all_skipped))  # +0.0, the start value


@pytest.mark.parametrize("dtype", DTYPES)
def test_finalize_weights_are_rounded_before_the_sum(dtype):
    h = HALF_ULP[dtype]  # the ulp at 1.0 is 2h
    rows = torch.tensor([[1.0 + 2 * h] * 16, [h] * 16]).to(dtype)
    idx = torch.tensor([[0, 1]], dtype=torch.int32)
    w = torch.tensor([[1.0 + 2 * h, 1.0]]).to(dtype)
    got = moe_finalize(rows, idx, w)
    # (1 + 2h)^2 = 1 + 4h + 4h^2 rounds to 1 + 4h; adding h is then a tie, kept at the even
    # 1 + 4h. Without that rounding the sum 1 + 5h + 4h^2 would round up to 1 + 6h.
    assert torch.all(got == 1.0 + 4 * h)
    unrounded = (rows.float() * w.float().t()).sum(dim=0).to(dtype)
    assert torch.all(unrounded == 1.0 + 6 * h)


@pytest.mark.parametrize(
    "rsf,expected",
    [(None, 3.0), (1.0, 3.0), (2.0, 6.0), (0.5, 1.5), (0.1, 0.30078125)],  # 3 * fp32(0.1) in bf16
)
def test_finalize_routed_scaling(rsf, expected):
    rows = torch.tensor([[1.0] * 16, [2.0] * 16], dtype=BF16)
    idx = torch.tensor([[0, 1]], dtype=torch.int32)
    got = moe_finalize(rows, idx, routed_scaling_factor=rsf)
    assert torch.all(got == expected), (rsf, got[0, 0].item())


def test_finalize_routed_scaling_before_the_shared_output():
    rows = torch.tensor([[3.0] * 16], dtype=BF16)
    idx = torch.tensor([[0]], dtype=torch.int32)
    shared = torch.tensor([[1.0] * 16], dtype=BF16)
    got = moe_finalize(rows, idx, routed_scaling_factor=2.0, shared_expert_output=shared)
    assert torch.all(got == 7.0)  # 3 * 2 + 1, not (3 + 1) * 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2, 4, 8])
@pytest.mark.parametrize("weights,shared,rsf", [(False, False, None), (True, True, 0.7)])
def test_finalize_matches_the_scalar_oracle(gen, dtype, top_k, weights, shared, rsf):
    n, d, p = 3, 16, 3 * top_k + 2
    rows = _values(gen, (p, d), dtype, 3.0)
    perm = torch.randperm(p, generator=gen)[: n * top_k].reshape(n, top_k).to(torch.int32)
    skip = torch.rand(n, top_k, generator=gen) < 0.25
    idx = torch.where(skip, torch.full_like(perm, -1), perm)
    w = _values(gen, (n, top_k), dtype) if weights else None
    sh = _values(gen, (n, d), dtype) if shared else None
    got = moe_finalize(rows, idx, w, rsf, sh)
    assert torch.equal(got, _oracle_finalize(rows, idx, w, rsf, sh))


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"rows": lambda t: t.float()}, TypeError, "allreduce_in.dtype"),
        ({"idx": lambda t: t.long()}, TypeError, "must be an int32"),
        ({"idx": lambda t: t.reshape(-1)}, ValueError, r"must be \[N, top_k\]"),
        ({"idx": lambda t: t.clone().fill_(-2)}, ValueError, "-1 or a row"),
        ({"idx": lambda t: t.clone().fill_(8)}, ValueError, r"0\.\.7"),
        ({"w": lambda t: t.float()}, TypeError, "expert_scale_factor.dtype"),
        ({"w": lambda t: t[:, :1]}, ValueError, r"expert_scale_factor must have shape \(2, 2\)"),
        ({"sh": lambda t: t.half()}, TypeError, "shared_expert_output.dtype"),
        ({"sh": lambda t: t[:1]}, ValueError, r"shared_expert_output must have shape \(2, 16\)"),
    ],
)
def test_finalize_rejects_bad_arguments(gen, change, error, match):
    args = {
        "rows": _values(gen, (8, 16), BF16),
        "idx": torch.tensor([[0, 3], [7, -1]], dtype=torch.int32),
        "w": _values(gen, (2, 2), BF16),
        "sh": _values(gen, (2, 16), BF16),
    }
    for key, fn in change.items():
        args[key] = fn(args[key])
    with pytest.raises(error, match=match):
        moe_finalize(args["rows"], args["idx"], args["w"], None, args["sh"])


# ------------------------------------------------------------------------------------------
# moe_allreduce_fusion_reference


def test_rank_sum_is_fp32_in_rank_order_then_residual_and_norm():
    h = HALF_ULP[BF16]
    d = 16
    ones = torch.ones(1, 1, d)
    # three ranks, one expert each: prologue results v / 2 + v / 2 = 1, h, h
    xs = [(ones * v).to(BF16) for v in (1.0, h, h)]
    scales = [torch.full((1, 1), 0.5)] * 3
    toks = [torch.full((1, d), v / 2).to(BF16) for v in (1.0, h, h)]
    residual = torch.full((1, d), 1.0 - 2 * h).to(BF16)  # 1 + 2h + (1 - 2h) = 2
    gamma = torch.full((d,), 0.75).to(BF16)
    out = moe_allreduce_fusion_reference(
        P.kMoEReductionARResidualRMSNorm,
        residual,
        gamma,
        rms_eps=0.0,
        active_experts_token_input=xs,
        scale_input=scales,
        token_input=toks,
    )
    assert set(out) == {"moe_allreduce_out", "residual_out", "norm_out"}
    # fp32 in rank order: 1 + h + h = 1 + 2h (pairwise in T would stay at 1.0)
    assert torch.all(out["moe_allreduce_out"] == 1.0 + 2 * h)
    assert torch.all(out["residual_out"] == 2.0)
    # a constant row c: rstd = 1 / |c| exactly when eps = 0, so norm = sign(c) * gamma
    assert torch.all(out["norm_out"] == 0.75)


def test_finalize_pattern_with_nvfp4_in_each_layout():
    d = 16
    rows = [torch.full((3, d), v).to(BF16) for v in (0.25, 0.75)]  # per rank, P = 3
    idx = [torch.tensor([[2], [0]], dtype=torch.int32), torch.tensor([[1], [1]], dtype=torch.int32)]
    residual = torch.full((2, d), 1.0).to(BF16)
    gamma = torch.ones(d).to(BF16)
    out = {}
    for layout in (L.LINEAR, L.SWIZZLED_128x4, L.SWIZZLED_8x4):
        out[layout] = moe_allreduce_fusion_reference(
            P.kMoEFinalizeARResidualRMSNorm,
            residual,
            gamma,
            rms_eps=0.0,
            allreduce_in=rows,
            expanded_idx_to_permuted_idx=idx,
            routed_scaling_factor=1.0,
            quantize=True,
            scale_factor=1.0,
            layout_code=layout,
            sf_poison=0xEE,
        )
    linear = out[L.LINEAR]
    assert "moe_allreduce_out" not in linear
    assert torch.all(linear["residual_out"] == 2.0) and torch.all(linear["norm_out"] == 1.0)
    # a block of ones with G = 1: SF = e4m3(1/6) = 0.171875 (byte 0x23); 1 / 0.171875 = 5.8
    # rounds to the E2M1 code 7 (+6), two per byte.
    assert torch.equal(linear["quant_out"], torch.full((2, d // 2), 0x77, dtype=torch.uint8))
    assert linear["scale_out"].tolist() == [0x23, 0x23]
    swz = out[L.SWIZZLED_128x4]["scale_out"]
    assert swz.numel() == 512 and swz[0] == swz[16] == 0x23  # rows 0 and 1: offsets 0, 16
    assert int((swz == 0xEE).sum()) == 510  # padding keeps the poison
    assert out[L.SWIZZLED_8x4]["scale_out"][[0, 4]].tolist() == [0x23, 0x23]


def test_reference_matches_its_parts_per_rank(gen):
    w, n, d = 2, 4, 32
    rows = [_values(gen, (9, d), F16) for _ in range(w)]
    idx = [torch.randint(-1, 9, (n, 4), generator=gen, dtype=torch.int32) for _ in range(w)]
    weights = [_values(gen, (n, 4), F16), None]
    shared = [None, _values(gen, (n, d), F16)]
    residual = _values(gen, (n, d), F16)
    gamma = _values(gen, (d,), F16)
    out = moe_allreduce_fusion_reference(
        P.kMoEFinalizeARResidualRMSNorm,
        residual,
        gamma,
        allreduce_in=rows,
        expanded_idx_to_permuted_idx=idx,
        expert_scale_factor=weights,
        routed_scaling_factor=0.3,
        shared_expert_output=shared,
    )
    parts = [moe_finalize(rows[q], idx[q], weights[q], 0.3, shared[q]) for q in range(w)]
    s = fusion_all_reduce(parts)
    assert torch.equal(out["residual_out"], (s.float() + residual.float()).to(F16))


@pytest.mark.parametrize(
    "pattern,kw,match",
    [
        (5, {}, "must be 6 or 7"),
        (6, {"token_input": None}, "pattern 6 needs"),
        (7, {"allreduce_in": None}, "pattern 7 needs"),
        (6, {"scale_input": []}, "one entry per rank"),
        (7, {"shared_expert_output": [None] * 3}, "one entry per rank"),
    ],
)
def test_reference_rejects_bad_patterns_and_rank_lists(gen, pattern, kw, match):
    args = {
        "active_experts_token_input": [_values(gen, (2, 2, 16), BF16)] * 2,
        "scale_input": [torch.ones(2, 2)] * 2,
        "token_input": [_values(gen, (2, 16), BF16)] * 2,
        "allreduce_in": [_values(gen, (3, 16), BF16)] * 2,
        "expanded_idx_to_permuted_idx": [torch.zeros(2, 1, dtype=torch.int32)] * 2,
        **kw,
    }
    residual, gamma = _values(gen, (2, 16), BF16), _values(gen, (16,), BF16)
    with pytest.raises(ValueError, match=match):
        moe_allreduce_fusion_reference(pattern, residual, gamma, **args)
