"""fusedcomm.reference.all_reduce on CPU: hand-computed sums where order and precision matter."""

import pytest
import torch

from fusedcomm import reference
from fusedcomm.reference import all_reduce

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
TWO24 = float(2**24)  # above it float32 cannot hold every integer
EIGHTH_ULP = 2.0**-8  # half a bf16 ulp at 1.0 (bf16 keeps 8 significant bits)


def _ranks(values, dtype):
    """One 1-element tensor per rank holding values[r] (each exactly representable in dtype)."""
    tensors = [torch.tensor([v], dtype=dtype) for v in values]
    for v, t in zip(values, tensors):
        assert t.item() == v, f"{v} is not exact in {dtype}"
    return tensors


def _naive_same_dtype(tensors):
    """Summing in the input dtype, rounding after every add: what the reference must not do."""
    acc = tensors[0].clone()
    for t in tensors[1:]:
        acc = acc + t
    return acc


# Each case: rank values, dtype, accumulate dtype, the reference result worked out by hand, and
# what rounding after every add in the input dtype would give instead (None: the same).
HAND_CASES = {
    # 256 + 1 = 257 is a bf16 tie (spacing 2 in [256, 512)) that rounds to even, 256, twice
    # over; in fp32 the sum 258 is exact and representable in bf16.
    "bf16_small_addends_survive": ([256.0, 1.0, 1.0], BF16, FP32, 258.0, 256.0),
    # 1 + 2^-8 is a tie at bf16's precision: rounding after each add loses both addends.
    "bf16_half_ulps_add_up": ([1.0, EIGHTH_ULP, EIGHTH_ULP], BF16, FP32, 1.0 + 2**-7, 1.0),
    # One final rounding, to nearest even: 1 + 3 * 2^-8 lies exactly between 1 + 2^-7 (odd
    # last bit) and 1 + 2^-6 (even): the even one wins.
    "bf16_final_tie_to_even": (
        [1.0, EIGHTH_ULP, EIGHTH_ULP, EIGHTH_ULP],
        BF16,
        FP32,
        1.0 + 2**-6,
        1.0,
    ),
    # A single tie in the final rounding goes down to even 1.0.
    "bf16_final_tie_down": ([1.0, EIGHTH_ULP], BF16, FP32, 1.0, None),
    # fp32 accumulation, rank order: (2^24 + 1) rounds to 2^24 in fp32, minus 2^24 is 0. In
    # float64 (or in another order) the true sum 1 survives.
    "bf16_rank_order_in_fp32": ([TWO24, 1.0, -TWO24], BF16, FP32, 0.0, None),
    "bf16_other_order_in_fp32": ([TWO24, -TWO24, 1.0], BF16, FP32, 1.0, None),
    "bf16_rank_order_in_fp64": ([TWO24, 1.0, -TWO24], BF16, FP64, 1.0, 0.0),
    # fp16: spacing 2 in [2048, 4096); 2048 + 1 ties to 2048.
    "fp16_small_addends_survive": ([2048.0, 1.0, 1.0], FP16, FP32, 2050.0, 2048.0),
    # fp32 inputs: the adds themselves round; float64 accumulation keeps 2^24 + 2.
    "fp32_accumulate_fp32": ([TWO24, 1.0, 1.0], FP32, FP32, TWO24, None),
    "fp32_accumulate_fp64": ([TWO24, 1.0, 1.0], FP32, FP64, TWO24 + 2.0, TWO24),
    "fp64_single_rank": ([0.1], FP64, FP64, 0.1, None),
}


@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_hand_computed(case):
    values, dtype, accumulate, want, naive = HAND_CASES[case]
    inputs = _ranks(values, dtype)
    got = all_reduce(inputs, accumulate=accumulate)
    assert got.dtype == dtype and got.shape == (1,)
    assert got.item() == want, f"{case}: got {got.item()!r}, want {want!r}"
    if naive is not None:  # the case really separates the two summation schemes
        assert _naive_same_dtype(inputs).item() == naive != want


def test_default_accumulates_in_fp32():
    inputs = _ranks([TWO24, 1.0, -TWO24], BF16)
    assert torch.equal(all_reduce(inputs), all_reduce(inputs, accumulate=FP32))
    assert all_reduce(inputs).item() == 0.0


def test_rank_order_is_ascending():
    # Same three values per column, different rank order. In fp32, 2^24 + 1 rounds to 2^24
    # while -2^24 + 1 is exact, so only an order that adds 1 last (or to -2^24) keeps it.
    a = torch.tensor([TWO24, 1.0], dtype=BF16)
    b = torch.tensor([1.0, TWO24], dtype=BF16)
    c = torch.tensor([-TWO24, -TWO24], dtype=BF16)
    assert all_reduce([a, b, c]).tolist() == [0.0, 0.0]  # (2^24 + 1) - 2^24 both ways
    assert all_reduce([c, a, b]).tolist() == [1.0, 1.0]  # (-2^24 + 2^24) + 1; (-2^24 + 1) + 2^24


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_small_integers_are_exact(dtype):
    # Sums of small integers are exact in fp32 and representable in every dtype here.
    gen = torch.Generator().manual_seed(11)
    ints = [torch.randint(-64, 64, (4, 33), generator=gen) for _ in range(8)]
    got = all_reduce([t.to(dtype) for t in ints])
    assert got.dtype == dtype
    assert torch.equal(got, sum(ints).to(dtype))


def test_matches_an_explicit_elementwise_loop():
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(3, 7, generator=gen).to(BF16) for _ in range(4)]
    got = all_reduce(inputs)
    for i in range(3):
        for j in range(7):
            acc = inputs[0][i, j].float()
            for t in inputs[1:]:
                acc = acc + t[i, j].float()
            assert got[i, j].item() == acc.to(BF16).item(), (i, j)


def test_output_is_new_contiguous_and_inputs_untouched():
    base = torch.arange(24, dtype=FP32).view(4, 6)
    strided = [base.t(), (base + 1).t(), base[:, ::1].t() * 2]  # non-contiguous views
    before = [t.clone() for t in strided]
    got = all_reduce(strided)
    assert got.shape == (6, 4) and got.is_contiguous()
    assert torch.equal(got, base.t() * 4 + 1)
    for t, old in zip(strided, before):
        assert torch.equal(t, old)
    single = all_reduce([base])
    assert torch.equal(single, base) and single.data_ptr() != base.data_ptr()
    single.add_(1)
    assert base[0, 0].item() == 0.0


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (5,)])
def test_any_shape(shape):
    inputs = [torch.full(shape, float(r + 1), dtype=FP16) for r in range(3)]
    got = all_reduce(inputs)
    assert got.shape == shape and got.dtype == FP16
    assert torch.equal(got, torch.full(shape, 6.0, dtype=FP16))


def test_storage_offsets():
    base = torch.arange(16, dtype=BF16)
    got = all_reduce([base[3:11], base[5:13]])
    assert torch.equal(got, (torch.arange(3, 11) + torch.arange(5, 13)).to(BF16))


def test_package_reexports():
    from fusedcomm.reference import allreduce

    assert reference.all_reduce is allreduce.all_reduce
    assert "all_reduce" in reference.__all__


@pytest.mark.parametrize(
    "inputs, kwargs, exc, pattern",
    [
        ([], {}, ValueError, r"all_reduce: inputs must hold one tensor per rank, got 0"),
        (torch.ones(2), {}, TypeError, r"sequence of tensors"),
        ([torch.ones(2), [1.0, 1.0]], {}, TypeError, r"inputs\[1\] must be a Tensor, got list"),
        ([torch.ones(2, dtype=torch.int32)] * 2, {}, TypeError, r"dtype torch.int32"),
        ([torch.ones(2), torch.ones(2, dtype=FP16)], {}, TypeError, r"inputs\[1\].dtype"),
        ([torch.ones(2), torch.ones(3)], {}, ValueError, r"inputs\[1\].shape \(\(3,\)\)"),
        ([torch.ones(2)], {"accumulate": BF16}, TypeError, r"accumulate \(torch.bfloat16\)"),
        ([torch.ones(2, dtype=FP64)], {}, TypeError, r"narrower than the inputs"),
    ],
)
def test_argument_errors(inputs, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        all_reduce(inputs, **kwargs)


def test_device_mismatch():
    meta = torch.ones(2, device="meta")
    with pytest.raises(ValueError, match=r"inputs\[1\] is on meta, inputs\[0\] on cpu"):
        all_reduce([torch.ones(2), meta])
