"""References for the block quantisers: NVFP4 and per-token-group FP8. Plain torch, any device.

Every step is an fp32 operation with a fixed order, so a kernel that follows the same sequence
produces the same bytes and is compared with ``torch.equal``:

- E2M1 codes (:func:`e2m1_encode`, :func:`e2m1_decode`) and their two-per-byte packing;
- NVFP4 (:func:`quantize_nvfp4`, :func:`dequantize_nvfp4`): 16-element blocks, one E4M3 scale
  byte per block derived from the global scale;
- the byte layouts of NVFP4 scale factors (:func:`scale_factor_offsets`,
  :func:`write_scale_factors`, :func:`read_scale_factors`) and the public size helper
  :func:`compute_fp4_swizzled_layout_sf_size`;
- UE8M0 exponents (:func:`ue8m0_encode`, :func:`ue8m0_decode`) and per-token-group FP8 with the
  exponents packed four per int32 in a column-major, padded tensor
  (:func:`quantize_fp8_per_token_group`, :func:`pack_ue8m0_scales`,
  :func:`unpack_ue8m0_scales`, :func:`dequantize_fp8_per_token_group`).
"""

from __future__ import annotations

import operator

import torch

from ..enums import FP8_E4M3_MAX, QuantizationSFLayout
from .fusion import fp8_e4m3

__all__ = [
    "compute_fp4_swizzled_layout_sf_size",
    "dequantize_fp8_per_token_group",
    "dequantize_nvfp4",
    "e2m1_decode",
    "e2m1_encode",
    "pack_e2m1",
    "pack_ue8m0_scales",
    "quantize_fp8_per_token_group",
    "quantize_nvfp4",
    "read_scale_factors",
    "round_scale_up_to_pow2",
    "scale_factor_buffer_size",
    "scale_factor_offsets",
    "ue8m0_decode",
    "ue8m0_encode",
    "unpack_e2m1",
    "unpack_ue8m0_scales",
    "write_scale_factors",
]

NVFP4_BLOCK = 16
E2M1_MAX = 6.0
GROUP_FP8_MIN_SCALE = 1e-10  # read as fp32, like every constant of the group quantiser

# Magnitudes of the eight E2M1 codes 0..7; bit 3 of a code is the sign.
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Decision points between neighbouring magnitudes. Each midpoint goes to the code with an even
# mantissa (even index), so the comparison is ">" where the lower code is even and ">=" where
# the lower code is odd.
_E2M1_STEPS = (
    (0.25, False),
    (0.75, True),
    (1.25, False),
    (1.75, True),
    (2.5, False),
    (3.5, True),
    (5.0, False),
)
_SF_LAYOUTS = {
    QuantizationSFLayout.SWIZZLED_128x4: "SWIZZLED_128x4",
    QuantizationSFLayout.SWIZZLED_8x4: "SWIZZLED_8x4",
    QuantizationSFLayout.LINEAR: "LINEAR",
}
_NVFP4_INPUTS = (torch.float16, torch.bfloat16, torch.float32)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _fp32_scalar(value, name: str, op: str) -> torch.Tensor:
    """A float, or a tensor's first element, as a CPU fp32 0-d tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            raise ValueError(f"{op}: {name} is an empty tensor")
        return value.reshape(-1)[0].detach().float().cpu()
    return torch.tensor(float(value), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# E2M1


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """E2M1 code of each value: ``code = (signbit(x) << 3) | index(round_rne_sat(|x|))``.

    ``|x|`` (read as fp32) is rounded to the nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6, whose
    indices 0..7 are the low three bits of the code; a value exactly half-way goes to the even
    index (0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 2.5 -> 2, 5 -> 4), and anything above 6,
    infinity included, saturates to 6. Bit 3 is the sign bit of ``x`` itself, so ``-0.0`` and
    small negatives that round to zero give code 8 (negative zero). NaN has no E2M1 encoding
    and lies outside the kernels' contract; here it maps to code 7 (+6).

    Returns a ``uint8`` tensor of ``x``'s shape with values 0..15.
    """
    xf = x.float()
    mag = xf.abs()
    index = torch.zeros(xf.shape, dtype=torch.uint8, device=xf.device)
    for point, inclusive in _E2M1_STEPS:
        above = mag >= point if inclusive else mag > point
        index += above.to(torch.uint8)
    nan = torch.isnan(xf)
    index = torch.where(nan, torch.full_like(index, 7), index)
    sign = (torch.signbit(xf) & ~nan).to(torch.uint8) << 3
    return sign | index


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Value of each E2M1 code: ``(-1 if code & 8 else 1) * (0, .5, 1, 1.5, 2, 3, 4, 6)[code & 7]``.

    ``codes``: an integer tensor with values 0..15. Returns fp32 of the same shape; code 8
    decodes to ``-0.0``.
    """
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("e2m1_decode: codes must lie in 0..15")
    table = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=c.device)
    mag = table[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte: ``byte[..., i] = codes[..., 2i] | (codes[..., 2i + 1] << 4)``.

    ``codes``: ``[..., D]`` with ``D`` even, values 0..15. Returns ``uint8 [..., D/2]``.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1: the last dimension ({codes.shape[-1]}) must be even")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_e2m1`: ``codes[..., 2i] = byte & 15``, ``codes[..., 2i+1] = byte >> 4``.

    ``packed``: ``uint8 [..., D/2]``. Returns ``uint8 [..., D]``.
    """
    p = packed.to(torch.uint8)
    return torch.stack((p & 15, p >> 4), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# ---------------------------------------------------------------------------------------------
# NVFP4


def quantize_nvfp4(y: torch.Tensor, global_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 quantisation of each row in 16-element blocks, returning ``(packed, sf)``.

    Sequence, per block ``b`` of 16 consecutive values of a row (fp32 arithmetic, ``G`` the
    global scale as fp32, ``1/6`` the fp32 constant)::

        m = max_j |float(y_j)|                      # exact
        sf = e4m3(G * (m * (1/6)))                  # saturating RNE; the stored scale byte
        k = G / float(sf) if float(sf) != 0 else 0  # fp32 division
        q_j = e2m1_encode(float(y_j) * k)           # RNE, saturating to +-6
        packed[2i / 2] = q_{2i} | q_{2i+1} << 4     # low nibble first

    ``y``: ``[N, D]`` float16 or bfloat16 (float32 is accepted too, for hand-made inputs; the
    kernels take only 16-bit activations), ``D`` a multiple of 16. ``global_scale``: a float or
    a tensor whose first element is used; it multiplies (typically ``448 * 6 / amax``).

    Returns ``packed``: ``uint8 [N, D/2]`` and ``sf``: ``uint8 [N, D/16]``, the E4M3 bit
    patterns in row-major (LINEAR) order; :func:`write_scale_factors` places them in the other
    layouts.
    """
    op = "quantize_nvfp4"
    if y.dtype not in _NVFP4_INPUTS:
        raise TypeError(f"{op}: y.dtype ({y.dtype}) must be float16, bfloat16 or float32")
    if y.dim() != 2 or y.shape[1] % NVFP4_BLOCK:
        raise ValueError(f"{op}: y must be [N, D] with D a multiple of 16, got {tuple(y.shape)}")
    n, d = y.shape
    g = _fp32_scalar(global_scale, "global_scale", op).to(y.device)
    sixth = torch.tensor(1.0 / 6.0, dtype=torch.float32, device=y.device)
    blocks = y.float().reshape(n, d // NVFP4_BLOCK, NVFP4_BLOCK)
    m = blocks.abs().amax(dim=-1, keepdim=True)
    sf = fp8_e4m3(g * (m * sixth))
    sf_f = sf.float()
    k = torch.where(sf_f != 0, g / sf_f, torch.zeros_like(sf_f))
    codes = e2m1_encode(blocks * k).reshape(n, d)
    return pack_e2m1(codes), sf.view(torch.uint8).reshape(n, d // NVFP4_BLOCK)


def dequantize_nvfp4(packed: torch.Tensor, sf: torch.Tensor, global_scale) -> torch.Tensor:
    """Approximate inverse of :func:`quantize_nvfp4`: ``y_j = (e2m1_decode(q_j) * float(sf_b)) / G``.

    ``packed``: ``uint8 [N, D/2]``; ``sf``: ``uint8 [N, D/16]`` E4M3 bit patterns in LINEAR
    order (:func:`read_scale_factors` recovers them from a swizzled buffer). Returns fp32
    ``[N, D]``. Within a block whose scale is a normal E4M3 value below 448 the error is at most
    ``float(sf_b) / G`` (half the widest code step) plus fp32 rounding.
    """
    op = "dequantize_nvfp4"
    n, half = packed.shape
    d = half * 2
    if d % NVFP4_BLOCK or tuple(sf.shape) != (n, d // NVFP4_BLOCK):
        raise ValueError(
            f"{op}: sf must be [{n}, {d // NVFP4_BLOCK}] for packed {tuple(packed.shape)}, "
            f"got {tuple(sf.shape)}"
        )
    g = _fp32_scalar(global_scale, "global_scale", op).to(packed.device)
    values = e2m1_decode(unpack_e2m1(packed)).reshape(n, d // NVFP4_BLOCK, NVFP4_BLOCK)
    scale = sf.to(torch.uint8).contiguous().view(torch.float8_e4m3fn).float().unsqueeze(-1)
    return ((values * scale) / g).reshape(n, d)


# ---------------------------------------------------------------------------------------------
# Scale-factor layouts


def compute_fp4_swizzled_layout_sf_size(total_row: int, total_column: int) -> int:
    """``round_up(total_row, 128) * round_up(total_column, 4)``: bytes of a SWIZZLED_128x4 buffer.

    ``total_row`` is the number of rows (tokens), ``total_column`` the number of scale-factor
    columns (hidden size / 16, not the element count). Pure Python; no device work.
    """
    rows = operator.index(total_row)
    cols = operator.index(total_column)
    if rows < 0 or cols < 0:
        raise ValueError(
            "compute_fp4_swizzled_layout_sf_size: total_row and total_column must be >= 0, "
            f"got {rows} and {cols}"
        )
    return _round_up(rows, 128) * _round_up(cols, 4)


def _check_layout(op: str, layout) -> int:
    try:
        code = operator.index(layout)
    except TypeError:
        code = None
    if code not in _SF_LAYOUTS:
        raise ValueError(
            f"{op}: layout must be a QuantizationSFLayout (0 = SWIZZLED_128x4, "
            f"1 = SWIZZLED_8x4, 2 = LINEAR), got {layout!r}"
        )
    return code


def scale_factor_buffer_size(rows: int, columns: int, layout) -> int:
    """Bytes of a scale-factor buffer: ``rows * columns`` (LINEAR), else whole tiles.

    SWIZZLED_128x4: ``round_up(rows, 128) * round_up(columns, 4)``
    (= :func:`compute_fp4_swizzled_layout_sf_size`); SWIZZLED_8x4: ``round_up(rows, 8) *
    round_up(columns, 4)``. ``columns`` counts scale factors (hidden size / 16).
    """
    code = _check_layout("scale_factor_buffer_size", layout)
    if code == QuantizationSFLayout.LINEAR:
        return rows * columns
    tile_rows = 128 if code == QuantizationSFLayout.SWIZZLED_128x4 else 8
    return _round_up(rows, tile_rows) * _round_up(columns, 4)


def scale_factor_offsets(rows: int, columns: int, layout) -> torch.Tensor:
    """Byte offset of scale factor ``(m, k)`` in a buffer of the given layout, as ``[rows, columns]``.

    With ``Kt = ceil(columns / 4)``::

        LINEAR:          m * columns + k
        SWIZZLED_128x4:  (m // 128) * Kt * 512 + (k // 4) * 512
                         + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4
        SWIZZLED_8x4:    (m // 8) * Kt * 32 + (k // 4) * 32 + (m % 8) * 4 + k % 4

    Returns an int64 CPU tensor; every offset is below :func:`scale_factor_buffer_size`.
    """
    code = _check_layout("scale_factor_offsets", layout)
    m = torch.arange(rows, dtype=torch.int64).unsqueeze(1)
    k = torch.arange(columns, dtype=torch.int64).unsqueeze(0)
    if code == QuantizationSFLayout.LINEAR:
        return m * columns + k
    kt = (columns + 3) // 4
    if code == QuantizationSFLayout.SWIZZLED_128x4:
        return (
            (m // 128) * (kt * 512) + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4
        )
    return (m // 8) * (kt * 32) + (k // 4) * 32 + (m % 8) * 4 + k % 4


def write_scale_factors(sf: torch.Tensor, layout, *, poison: int) -> torch.Tensor:
    """Scale-factor buffer as a kernel leaves it: ``buf = [poison] * size; buf[offset(m, k)] = sf[m, k]``.

    ``sf``: ``uint8 [N, K]`` (for example the second result of :func:`quantize_nvfp4`);
    ``layout``: a :class:`~fusedcomm.QuantizationSFLayout` value. The buffer has
    :func:`scale_factor_buffer_size` bytes. The kernels never write the padding rows and
    columns of the swizzled layouts, so those bytes keep what the buffer held before: fill the
    kernel's buffer with ``poison`` (0..255) before the call and compare the whole buffer.
    Returns ``uint8 [size]`` on ``sf``'s device.
    """
    op = "write_scale_factors"
    code = _check_layout(op, layout)
    if sf.dim() != 2:
        raise ValueError(f"{op}: sf must be [N, K], got {tuple(sf.shape)}")
    if not 0 <= int(poison) <= 255:
        raise ValueError(f"{op}: poison must be a byte value 0..255, got {poison}")
    n, k = sf.shape
    buf = torch.full(
        (scale_factor_buffer_size(n, k, code),), int(poison), dtype=torch.uint8, device=sf.device
    )
    offsets = scale_factor_offsets(n, k, code).to(sf.device)
    buf[offsets.reshape(-1)] = sf.reshape(-1).view(torch.uint8)
    return buf


def read_scale_factors(buffer: torch.Tensor, rows: int, columns: int, layout) -> torch.Tensor:
    """Inverse of :func:`write_scale_factors`: ``sf[m, k] = buffer[offset(m, k)]``.

    ``buffer``: any tensor holding at least :func:`scale_factor_buffer_size` bytes (read as
    raw bytes). Returns ``uint8 [rows, columns]``.
    """
    op = "read_scale_factors"
    code = _check_layout(op, layout)
    raw = buffer.contiguous().reshape(-1).view(torch.uint8)
    need = scale_factor_buffer_size(rows, columns, code)
    if raw.numel() < need:
        raise ValueError(f"{op}: buffer holds {raw.numel()} bytes, the layout needs {need}")
    offsets = scale_factor_offsets(rows, columns, code).to(raw.device)
    return raw[offsets]


# ---------------------------------------------------------------------------------------------
# UE8M0 and per-token-group FP8


def round_scale_up_to_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= each fp32 value: ``bits = (bits & 0x7F800000) + (1 << 23)`` if the
    mantissa bits are not all zero, else unchanged.

    Meant for positive normal fp32 scales (the group quantiser's are at least 1e-10); a value
    at the top binade rounds to infinity. Returns fp32 of ``scale``'s shape.
    """
    bits = scale.float().contiguous().view(torch.int32)
    mantissa = bits & 0x7FFFFF
    up = (bits & 0x7F800000) + 0x800000
    return torch.where(mantissa != 0, up, bits).view(torch.float32)


def ue8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """UE8M0 byte of a power-of-two scale: ``bits(fp32(scale)) >> 23``, the biased exponent.

    ``scale``: positive powers of two in the fp32 normal range (``2**-126 .. 2**127``);
    anything else raises ``ValueError``. Returns ``uint8`` of ``scale``'s shape
    (``2**e`` -> ``e + 127``).
    """
    bits = scale.float().contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    ok = (bits >= 0) & ((bits & 0x7FFFFF) == 0) & (exponent > 0) & (exponent < 255)
    if not bool(ok.all()):
        raise ValueError("ue8m0_encode: every scale must be a positive normal power of two")
    return exponent.to(torch.uint8)


def ue8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """Scale of each UE8M0 byte: ``2 ** (code - 127)`` as fp32 (code 0 -> 0.0, 255 -> inf).

    Built from the bit pattern ``code << 23``, so the result is exact. Returns fp32 of
    ``codes``' shape.
    """
    return (codes.to(torch.int32) << 23).view(torch.float32)


def _group_layout(op: str, n: int, num_groups: int) -> tuple[int, int]:
    if n < 0 or num_groups < 1:
        raise ValueError(f"{op}: need N >= 0 rows and at least one group, got {n}, {num_groups}")
    return (num_groups + 3) // 4, _round_up(n, 4)


def pack_ue8m0_scales(codes: torch.Tensor) -> torch.Tensor:
    """Pack UE8M0 bytes four per int32 into the column-major padded layout of the group quantiser.

    Sequence, with ``codes``: ``uint8 [N, G]``, ``K = ceil(G / 4)``, ``M = round_up(N, 4)``::

        storage = int32[N + (K - 1) * M], all zero
        for t, k: byte (k % 4) (little-endian) of storage[(k // 4) * M + t] = codes[t, k]
        out = as_strided(storage, size=(N, K), stride=(1, M))

    Everything in the storage is defined: the unused high bytes of a row's last pack and the
    padding rows ``t in [N, M)`` of packs ``0 .. K-2`` are 0 (the kernels write these zeros),
    and the last pack has no padding rows inside the storage. Returns the strided int32
    tensor on ``codes``' device; ``out.untyped_storage()`` is exactly that storage.
    """
    op = "pack_ue8m0_scales"
    if codes.dim() != 2:
        raise ValueError(f"{op}: codes must be [N, G], got {tuple(codes.shape)}")
    n, groups = codes.shape
    k, m = _group_layout(op, n, groups)
    padded = torch.zeros((n, 4 * k), dtype=torch.int64, device=codes.device)
    padded[:, :groups] = codes.to(torch.uint8).to(torch.int64)
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=codes.device)
    words = (padded.reshape(n, k, 4) << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement
    grid = torch.zeros((k, m), dtype=torch.int32, device=codes.device)
    grid[:, :n] = words.t()
    storage = grid.reshape(-1)[: n + (k - 1) * m].clone()
    return torch.as_strided(storage, (n, k), (1, m))


def unpack_ue8m0_scales(packed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0_scales`: ``codes[t, k] = (packed[t, k // 4] >> 8 * (k % 4)) & 255``.

    ``packed``: int32 ``(N, K)`` with any strides (the logical view is read). Returns
    ``uint8 [N, num_groups]``.
    """
    n, k = packed.shape
    if not 4 * (k - 1) < num_groups <= 4 * k:
        raise ValueError(f"unpack_ue8m0_scales: {k} packs cannot hold {num_groups} groups")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=packed.device)
    b = (words.unsqueeze(-1) >> shifts) & 0xFF
    return b.reshape(n, 4 * k)[:, :num_groups].to(torch.uint8)


def quantize_fp8_per_token_group(
    y: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 E4M3 with UE8M0 scales packed four per int32, returning ``(q, scale)``.

    Sequence, per group of ``g = group_size`` consecutive values of a row (fp32 arithmetic)::

        a = max_j |float(y_j)|
        s = max(a / 448, 1e-10)                   # fp32 division, fp32 constant
        s = round_scale_up_to_pow2(s)             # a power of two, >= the exact scale
        q_j = e4m3(clamp(float(y_j) / s, -448, 448))
        code = ue8m0_encode(s)                    # bits(s) >> 23
        scale = pack_ue8m0_scales(codes)          # (N, K) int32, strides (1, round_up(N, 4))

    ``y``: ``[N, D]`` float16, bfloat16 or float32; ``group_size`` > 0 must divide ``D`` (any
    value, powers of two or not). ``q``: ``float8_e4m3fn [N, D]``; ``scale``: see
    :func:`pack_ue8m0_scales` for the layout and its zero padding. Dequantisation:
    ``y ~ float(q) * 2 ** (code - 127)``.
    """
    op = "quantize_fp8_per_token_group"
    if y.dim() != 2:
        raise ValueError(f"{op}: y must be [N, D], got {tuple(y.shape)}")
    g = operator.index(group_size)
    n, d = y.shape
    if g <= 0 or d % g:
        raise ValueError(f"{op}: group_size ({g}) must be positive and divide D ({d})")
    groups = y.float().reshape(n, d // g, g)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    scale = amax / torch.full_like(amax, FP8_E4M3_MAX)
    scale = torch.maximum(scale, torch.full_like(scale, GROUP_FP8_MIN_SCALE))
    scale = round_scale_up_to_pow2(scale)
    q = fp8_e4m3(groups / scale).reshape(n, d)
    return q, pack_ue8m0_scales(ue8m0_encode(scale).reshape(n, d // g))


def dequantize_fp8_per_token_group(
    q: torch.Tensor, scale: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_per_token_group`: ``y_j = float(q_j) * 2 ** (code - 127)``.

    ``q``: ``float8_e4m3fn [N, D]``; ``scale``: the packed int32 ``(N, K)`` tensor. Returns
    fp32 ``[N, D]``; the product is exact (a power-of-two scale).
    """
    n, d = q.shape
    g = operator.index(group_size)
    if g <= 0 or d % g:
        raise ValueError(f"dequantize_fp8_per_token_group: group_size ({g}) must divide D ({d})")
    s = ue8m0_decode(unpack_ue8m0_scales(scale, d // g))
    return (q.float().reshape(n, d // g, g) * s.unsqueeze(-1)).reshape(n, d)
