"""The NVFP4, scale-factor layout and per-token-group FP8 references (CPU only)."""

import pytest
import torch

import fusedcomm
from fusedcomm.enums import QuantizationSFLayout as L
from fusedcomm.reference.quant import (
    compute_fp4_swizzled_layout_sf_size,
    dequantize_fp8_per_token_group,
    dequantize_nvfp4,
    e2m1_decode,
    e2m1_encode,
    pack_e2m1,
    pack_ue8m0_scales,
    quantize_fp8_per_token_group,
    quantize_nvfp4,
    read_scale_factors,
    round_scale_up_to_pow2,
    scale_factor_buffer_size,
    scale_factor_offsets,
    ue8m0_decode,
    ue8m0_encode,
    unpack_e2m1,
    unpack_ue8m0_scales,
    write_scale_factors,
)

LAYOUTS = [L.LINEAR, L.SWIZZLED_128x4, L.SWIZZLED_8x4]
E4M3_ONE = 0x38  # bit pattern of 1.0 in E4M3
E4M3_MAX = 0x7E  # 448


def _f32(values):
    return torch.tensor(values, dtype=torch.float32)


def _codes(values):
    return e2m1_encode(_f32(values)).tolist()


# ---------------------------------------------------------------------------------------------
# E2M1


@pytest.mark.parametrize(
    "x,code",
    [
        (0.0, 0),
        (0.25, 0),  # tie between 0 and 0.5: even index 0
        (0.2500001, 1),
        (0.74, 1),
        (0.75, 2),  # tie between 0.5 and 1.0: even index 2
        (1.25, 2),  # tie between 1.0 and 1.5
        (1.75, 4),  # tie between 1.5 and 2.0
        (2.5, 4),  # tie between 2 and 3: 2
        (2.51, 5),
        (3.5, 6),  # tie between 3 and 4: 4
        (5.0, 6),  # tie between 4 and 6: 4
        (5.01, 7),
        (6.0, 7),
        (6.5, 7),  # saturates
        (1e30, 7),
        (float("inf"), 7),
        (-0.0, 8),  # the sign bit of negative zero survives
        (-0.1, 8),  # rounds to negative zero
        (-0.5, 9),
        (-2.5, 12),
        (-7.0, 15),
        (float("-inf"), 15),
    ],
)
def test_e2m1_encode_rounds_to_nearest_even_and_saturates(x, code):
    assert _codes([x]) == [code]


def test_e2m1_decode_every_code_and_round_trip():
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_decode(codes)
    expected = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert values[:8].tolist() == expected
    assert values[8:].tolist() == [-v for v in expected]
    assert torch.signbit(values[8]) and not torch.signbit(values[0])
    assert torch.equal(e2m1_encode(values), codes)


def test_e2m1_decode_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="0..15"):
        e2m1_decode(torch.tensor([16]))


def test_pack_e2m1_puts_the_even_element_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(unpack_e2m1(packed), codes)
    with pytest.raises(ValueError, match="even"):
        pack_e2m1(torch.zeros(3, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# NVFP4 blocks


def _quant_one_block(values, g, dtype=torch.float32):
    y = torch.tensor([values], dtype=dtype)
    packed, sf = quantize_nvfp4(y, g)
    return unpack_e2m1(packed)[0].tolist(), sf[0].tolist()


def test_nvfp4_unit_scale_block_hits_every_tie():
    # G = 1 and block max 6: sf = e4m3(6 * fp32(1/6)) = 1.0, so every value is its own code.
    block = [6.0, 0.25, 0.75, 2.5, -0.0, -1.25, 5.0, 3.5]
    block += [1.75, -6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    codes, sf = _quant_one_block(block, 1.0, torch.float16)
    assert sf == [E4M3_ONE]
    assert codes == [7, 0, 2, 4, 8, 10, 6, 6, 4, 15, 1, 2, 3, 4, 5, 6]


def test_nvfp4_saturates_when_the_scale_rounds_down():
    # 6.3 / 6 = 1.05 rounds to the E4M3 scale 1.0, so 6.3 * k = 6.3 > 6 saturates to 6.
    codes, sf = _quant_one_block([6.3, -6.3, 5.5] + [0.0] * 13, 1.0)
    assert sf == [E4M3_ONE]
    assert codes[:3] == [7, 15, 7]


def test_nvfp4_scale_saturates_at_448():
    codes, sf = _quant_one_block([6.0, 1.0, -0.01, 0.001] + [0.0] * 12, 1e6)
    assert sf == [E4M3_MAX]
    assert codes[:4] == [7, 7, 15, 4]  # k = 1e6 / 448: 0.001 * k = 2.23 -> 2, the rest saturate


def test_nvfp4_zero_and_negative_zero_blocks():
    y = torch.tensor([[0.0] * 16 + [-0.0] * 16], dtype=torch.bfloat16)
    packed, sf = quantize_nvfp4(y, 3.0)
    assert sf.tolist() == [[0, 0]]
    assert unpack_e2m1(packed)[0].tolist() == [0] * 16 + [8] * 16
    back = dequantize_nvfp4(packed, sf, 3.0)[0]
    assert torch.equal(back, torch.zeros(32)) and bool(torch.signbit(back[16:]).all())


def test_nvfp4_scale_that_underflows_gives_signed_zeros():
    # max / 6 = 1.7e-5 is below half the smallest E4M3 subnormal (2**-10): sf = 0, k = 0.
    codes, sf = _quant_one_block([1e-4, -1e-4] + [0.0] * 14, 1.0)
    assert sf == [0]
    assert codes[:3] == [0, 8, 0]


def test_nvfp4_subnormal_scale_exact():
    # max = 3 * 2**-7: sf = 2**-8, an E4M3 subnormal (mantissa 2); k = 256.
    block = [3 * 2.0**-7, 2.0**-8, -(2.0**-9), 2.0**-10] + [0.0] * 12
    codes, sf = _quant_one_block(block, 1.0, torch.float16)
    assert sf == [0x02]
    assert codes[:4] == [7, 2, 9, 0]  # 6, 1, -0.5, and 0.25 ties down to 0


def test_nvfp4_subnormal_scale_rounded():
    # 0.01 / 6 = 0.00167 rounds to the smallest subnormal 2**-9; k = 512, 0.01 * 512 = 5.12 -> 6.
    codes, sf = _quant_one_block([0.01, 0.004] + [0.0] * 14, 1.0)
    assert sf == [0x01]
    assert codes[:2] == [7, 4]  # 2.048 -> 2


def test_nvfp4_global_scale_as_tensor_and_float_agree():
    torch.manual_seed(0)
    y = torch.randn(3, 48).to(torch.bfloat16)
    g = 448 * 6 / y.float().abs().max().item()
    a = quantize_nvfp4(y, g)
    b = quantize_nvfp4(y, torch.tensor([g], dtype=torch.float32))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert int(a[1].max()) == E4M3_MAX  # the block holding amax gets the largest scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 5, 33])
def test_nvfp4_round_trip_error_bounded_per_block(dtype, n):
    torch.manual_seed(n)
    d = 128
    y = (torch.randn(n, d) * torch.rand(n, 1) * 4).to(dtype)
    g = 448 * 6 / y.float().abs().max().item()
    packed, sf = quantize_nvfp4(y, g)
    assert packed.shape == (n, d // 2) and packed.dtype == torch.uint8
    assert sf.shape == (n, d // 16) and sf.dtype == torch.uint8
    back = dequantize_nvfp4(packed, sf, g)
    err = (back - y.float()).abs().reshape(n, d // 16, 16).amax(dim=-1)
    scale = sf.view(torch.float8_e4m3fn).float()
    # Normal scales have a relative error of at most 2**-4, so |y * k| <= 6.4 and the code error
    # is at most 1 (half the step between 4 and 6): |error| <= float(sf) / G.
    normal = (sf & 0x78) != 0
    bound = scale / g * (1 + 1e-5) + 1e-7
    assert bool(normal.any())
    assert bool((err <= bound)[normal].all())
    # The same input gives the same bytes.
    assert torch.equal(quantize_nvfp4(y, g)[0], packed)


def test_nvfp4_rejects_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_nvfp4(torch.zeros(2, 24, dtype=torch.float16), 1.0)
    with pytest.raises(TypeError, match="float16"):
        quantize_nvfp4(torch.zeros(2, 16, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="sf must be"):
        dequantize_nvfp4(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, 2), 1.0)


# ---------------------------------------------------------------------------------------------
# Scale-factor layouts


def _brute_force_offsets(rows, cols, layout):
    """Offsets from laying tiles out with reshape/permute, independent of the closed form."""
    if layout == L.LINEAR:
        return torch.arange(rows * cols).reshape(rows, cols)
    tile_rows = 128 if layout == L.SWIZZLED_128x4 else 8
    rt, kt = -(-rows // tile_rows), -(-cols // 4)
    ids = torch.arange(rt * tile_rows * kt * 4).reshape(rt * tile_rows, kt * 4)
    if layout == L.SWIZZLED_128x4:
        # row m = 128 * tr + 32 * r4 + r32 and column k = 4 * tc + c; a tile is [r32][r4][c].
        order = ids.reshape(rt, 4, 32, kt, 4).permute(0, 3, 2, 1, 4)
    else:
        order = ids.reshape(rt, 8, kt, 4).permute(0, 2, 1, 3)
    flat = order.reshape(-1)  # flat[position] = id of the (m, k) stored there
    position = torch.empty_like(flat)
    position[flat] = torch.arange(flat.numel())
    return position.reshape(rt * tile_rows, kt * 4)[:rows, :cols]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 5, 129])
@pytest.mark.parametrize("cols", [1, 3, 5])
def test_sf_offsets_match_a_brute_force_tile_map(layout, rows, cols):
    offsets = scale_factor_offsets(rows, cols, layout)
    assert torch.equal(offsets, _brute_force_offsets(rows, cols, layout))
    size = scale_factor_buffer_size(rows, cols, layout)
    assert offsets.unique().numel() == rows * cols and int(offsets.max()) < size


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows,cols", [(1, 1), (5, 3), (129, 5), (8, 4), (128, 8)])
def test_sf_writer_leaves_padding_poisoned(layout, rows, cols):
    torch.manual_seed(rows * 7 + cols)
    sf = torch.randint(0, 0x7F, (rows, cols), dtype=torch.uint8)
    buf = write_scale_factors(sf, layout, poison=0xA5)
    assert buf.dtype == torch.uint8 and buf.numel() == scale_factor_buffer_size(rows, cols, layout)
    written = torch.zeros(buf.numel(), dtype=torch.bool)
    written[scale_factor_offsets(rows, cols, layout).reshape(-1)] = True
    assert bool((buf[~written] == 0xA5).all())
    assert int((~written).sum()) == buf.numel() - rows * cols
    assert torch.equal(read_scale_factors(buf, rows, cols, layout), sf)


def test_sf_swizzled_128x4_hand_offsets():
    off = scale_factor_offsets(129, 5, L.SWIZZLED_128x4)
    assert off[0, 0] == 0 and off[0, 3] == 3 and off[0, 4] == 512
    assert off[1, 0] == 16 and off[31, 0] == 31 * 16 and off[32, 0] == 4 and off[127, 3] == 511
    assert off[128, 0] == 2 * 512  # next row tile starts after Kt = 2 column tiles
    off8 = scale_factor_offsets(9, 5, L.SWIZZLED_8x4)
    assert off8[1, 0] == 4 and off8[7, 3] == 31 and off8[0, 4] == 32 and off8[8, 0] == 64


def test_sf_buffer_sizes():
    assert scale_factor_buffer_size(5, 3, L.LINEAR) == 15
    assert scale_factor_buffer_size(5, 3, L.SWIZZLED_8x4) == 32
    assert scale_factor_buffer_size(9, 5, L.SWIZZLED_8x4) == 16 * 8
    for rows, cols in [(1, 1), (129, 5), (1000, 448)]:
        assert scale_factor_buffer_size(
            rows, cols, L.SWIZZLED_128x4
        ) == compute_fp4_swizzled_layout_sf_size(rows, cols)


def test_sf_layout_argument_checked():
    with pytest.raises(ValueError, match="QuantizationSFLayout"):
        scale_factor_offsets(1, 1, 3)
    with pytest.raises(ValueError, match="QuantizationSFLayout"):
        write_scale_factors(torch.zeros(1, 1, dtype=torch.uint8), "linear", poison=0)
    with pytest.raises(ValueError, match="poison"):
        write_scale_factors(torch.zeros(1, 1, dtype=torch.uint8), L.LINEAR, poison=256)
    with pytest.raises(ValueError, match="needs"):
        read_scale_factors(torch.zeros(100, dtype=torch.uint8), 5, 3, L.SWIZZLED_128x4)


@pytest.mark.parametrize(
    "rows,cols,size",
    [
        (0, 0, 0),
        (1, 1, 512),
        (5, 3, 512),
        (128, 4, 512),
        (129, 4, 1024),
        (128, 5, 1024),
        (256, 5, 2048),
        (1000, 448, 1024 * 448),  # 1000 tokens, hidden 7168
        (1, 180, 128 * 180),  # hidden 2880
    ],
)
def test_compute_fp4_swizzled_layout_sf_size(rows, cols, size):
    assert compute_fp4_swizzled_layout_sf_size(rows, cols) == size
    assert fusedcomm.compute_fp4_swizzled_layout_sf_size(rows, cols) == size
    assert type(compute_fp4_swizzled_layout_sf_size(rows, cols)) is int


def test_compute_fp4_swizzled_layout_sf_size_rejects_negative_and_non_integers():
    with pytest.raises(ValueError, match=">= 0"):
        compute_fp4_swizzled_layout_sf_size(-1, 4)
    with pytest.raises(TypeError):
        compute_fp4_swizzled_layout_sf_size(1.5, 4)


def test_nvfp4_scales_through_a_swizzled_buffer_dequantise_the_same():
    torch.manual_seed(3)
    y = torch.randn(5, 64).to(torch.float16)
    packed, sf = quantize_nvfp4(y, 2.0)
    buf = write_scale_factors(sf, L.SWIZZLED_128x4, poison=0xFF)
    assert buf.numel() == compute_fp4_swizzled_layout_sf_size(5, 4)
    back = read_scale_factors(buf, 5, 4, L.SWIZZLED_128x4)
    assert torch.equal(dequantize_nvfp4(packed, back, 2.0), dequantize_nvfp4(packed, sf, 2.0))


# ---------------------------------------------------------------------------------------------
# UE8M0 and per-token-group FP8


@pytest.mark.parametrize(
    "scale,code",
    [(1.0, 127), (2.0, 128), (0.5, 126), (2.0**-10, 117), (2.0**127, 254), (2.0**-126, 1)],
)
def test_ue8m0_encode_and_decode(scale, code):
    assert ue8m0_encode(_f32([scale])).tolist() == [code]
    assert ue8m0_decode(torch.tensor([code], dtype=torch.uint8)).tolist() == [scale]


@pytest.mark.parametrize("scale", [0.0, 3.0, -2.0, 2.0**-130, float("inf"), float("nan")])
def test_ue8m0_encode_rejects_non_powers_of_two(scale):
    with pytest.raises(ValueError, match="power of two"):
        ue8m0_encode(_f32([scale]))


def test_ue8m0_decode_every_byte():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = ue8m0_decode(codes)
    assert values[0] == 0 and values[255] == float("inf")
    assert torch.equal(ue8m0_encode(values[1:255]), codes[1:255])


@pytest.mark.parametrize(
    "value,expected",
    [
        (1.0, 1.0),
        (1.0000001, 2.0),
        (0.75, 1.0),
        (3.0, 4.0),
        (1.5 * 2.0**-20, 2.0**-19),
        (1e-10, 2.0**-33),
        (448.0, 512.0),
    ],
)
def test_round_scale_up_to_pow2(value, expected):
    assert round_scale_up_to_pow2(_f32([value])).tolist() == [expected]


def _group_codes(values, g):
    q, scale = quantize_fp8_per_token_group(torch.tensor([values], dtype=torch.float32), g)
    return q[0].float().tolist(), unpack_ue8m0_scales(scale, len(values) // g)[0].tolist()


def test_group_fp8_hand_computed_groups():
    values = [448.0, -1.0, 0.0, 2.0]  # a = 448: scale 1, codes unchanged
    values += [1.0, -0.5, 0.25, 0.0]  # a = 1: 1/448 rounds up to 2**-8, q = y * 256
    values += [0.0, 0.0, -0.0, 0.0]  # zero group: scale 1e-10 rounds up to 2**-33
    values += [896.0, 3.0, 0.0, 0.0]  # a / 448 = 2, already a power of two
    values += [449.0, 0.0, 0.0, 0.0]  # 449/448 -> 2; 224.5 ties to 224
    q, codes = _group_codes(values, 4)
    assert codes == [127, 119, 94, 128, 128]
    assert q[:8] == [448.0, -1.0, 0.0, 2.0, 256.0, -128.0, 64.0, 0.0]
    assert q[8:12] == [0.0] * 4 and torch.signbit(torch.tensor(q[10]))
    assert q[12:14] == [448.0, 1.5] and q[16] == 224.0


def test_group_fp8_packing_byte_order_and_padding():
    # N = 3 rows, G = 5 groups: K = 2 packs, M = 4 (rows padded to a multiple of 4).
    codes = torch.tensor(
        [[0x7F, 0x80, 0x81, 0xFE, 0x01], [1, 2, 3, 4, 5], [0xFF, 0, 0, 0x80, 0x10]],
        dtype=torch.uint8,
    )
    packed = pack_ue8m0_scales(codes)
    assert packed.dtype == torch.int32 and packed.shape == (3, 2) and packed.stride() == (1, 4)
    storage = torch.as_strided(packed, (3 + 4,), (1,)).tolist()
    assert packed.untyped_storage().nbytes() == 7 * 4

    def word(b0, b1, b2, b3):
        w = b0 | b1 << 8 | b2 << 16 | b3 << 24
        return w - 2**32 if w >= 2**31 else w

    assert storage == [
        word(0x7F, 0x80, 0x81, 0xFE),
        word(1, 2, 3, 4),
        word(0xFF, 0, 0, 0x80),
        0,  # padding row 3 of pack 0
        word(0x01, 0, 0, 0),  # the unused bytes of the last pack are 0
        word(5, 0, 0, 0),
        word(0x10, 0, 0, 0),
    ]
    raw = packed.untyped_storage()
    assert list(raw[:4]) == [0x7F, 0x80, 0x81, 0xFE]  # group k sits in byte k % 4, little-endian
    assert torch.equal(unpack_ue8m0_scales(packed, 5), codes)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 129])
@pytest.mark.parametrize("groups", [1, 3, 4, 5, 13])
def test_group_fp8_packing_against_brute_force(n, groups):
    torch.manual_seed(n * 31 + groups)
    codes = torch.randint(0, 256, (n, groups), dtype=torch.int32).to(torch.uint8)
    packed = pack_ue8m0_scales(codes)
    k, m = -(-groups // 4), -(-n // 4) * 4
    size = n + (k - 1) * m
    assert packed.stride() == (1, m) and packed.untyped_storage().nbytes() == 4 * size
    flat = torch.as_strided(packed, (size,), (1,)).to(torch.int64) & 0xFFFFFFFF
    expected = [0] * size
    for t in range(n):
        for j in range(groups):
            expected[(j // 4) * m + t] |= int(codes[t, j]) << (8 * (j % 4))
    assert flat.tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [1, 3, 16, 24, 128])
@pytest.mark.parametrize("n", [1, 5])
def test_group_fp8_round_trip_error_bounded(dtype, group_size, n):
    torch.manual_seed(group_size + n)
    d = 384
    y = (torch.randn(n, d) * torch.logspace(-3, 3, d)).to(dtype)
    q, scale = quantize_fp8_per_token_group(y, group_size)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (n, d)
    assert scale.shape == (n, -(-(d // group_size) // 4))
    s = ue8m0_decode(unpack_ue8m0_scales(scale, d // group_size))
    # The scale is a power of two at least amax / 448 and below 2 * amax / 448 (no saturation).
    amax = y.float().reshape(n, -1, group_size).abs().amax(dim=-1)
    live = amax > 448 * 1e-10
    assert bool((s * 448 >= amax).all())
    assert bool((s[live] * 448 < 2 * amax[live]).all())
    back = dequantize_fp8_per_token_group(q, scale, group_size)
    err = (back - y.float()).abs().reshape(n, -1, group_size)
    bound = torch.maximum(
        y.float().abs().reshape(n, -1, group_size) * 2.0**-4, s.unsqueeze(-1) * 2.0**-10
    )
    assert bool((err <= bound).all())


def test_group_fp8_rejects_bad_group_sizes():
    y = torch.zeros(2, 48, dtype=torch.float16)
    for g in (0, -16, 5, 96):
        with pytest.raises(ValueError, match="group_size"):
            quantize_fp8_per_token_group(y, g)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_ue8m0_scales(pack_ue8m0_scales(torch.zeros(2, 5, dtype=torch.uint8)), 9)


def test_public_names_are_exported():
    import fusedcomm.reference as ref

    assert ref.quantize_nvfp4 is quantize_nvfp4
    assert ref.write_scale_factors is write_scale_factors
    assert fusedcomm.compute_fp4_swizzled_layout_sf_size is compute_fp4_swizzled_layout_sf_size
    assert "compute_fp4_swizzled_layout_sf_size" in fusedcomm.__all__
