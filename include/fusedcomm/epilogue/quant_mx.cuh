// MX block quantisers of a row (OCP microscaling): 32-element blocks, one UE8M0 scale byte each,
// in an SfLayout (layout/quant_scales.cuh, columns = hidden / 32).
//
// Per block b (four neighbouring packs of 8 values, held by threads 4i .. 4i+3 of the block: the
// row's slots are strided by blockDim.x, a multiple of 4, so a block never straddles two slots):
//   m    = max |y_j| over the block (T values, exact)
//   s    = m / M (fp32 division; M = 448 for MXFP8, 6 for MXFP4)
//   e    = 0 if m == 0, else the biased exponent of s rounded up to a power of two, clamped
//          to [1, 253]                                        the stored scale byte
//   k    = 2^(127 - e) (exact), 0 when e == 0
//   MXFP8: q_j = e4m3(y_j * k), saturating      one byte per value (quant_fp8.cuh)
//   MXFP4: q_j = e2m1(y_j * k), two codes a byte  (common/e2m1.cuh)
// Each thread stores its pack's codes; the first thread of a block stores the scale byte.
// Needs T of 16 bits (8 values per pack).
#pragma once
#include "fusedcomm/common/e2m1.cuh"
#include "fusedcomm/epilogue/quant_fp8.cuh"
#include "fusedcomm/epilogue/quant_group_fp8.cuh"
#include "fusedcomm/layout/quant_scales.cuh"
#include "fusedcomm/proto/row.cuh"

namespace fusedcomm {

namespace detail {
// The scale byte and the multiplier k of a block whose largest magnitude is m.
__device__ __forceinline__ uint8_t mx_scale(float m, float max_code, float& k) {
  if (!(m > 0.0f)) {
    k = 0.0f;
    return 0;
  }
  uint32_t e = __float_as_uint(round_up_pow2(__fdiv_rn(m, max_code))) >> 23;
  e = e < 1u ? 1u : e > 253u ? 253u : e;
  k = pow2_inverse(__uint_as_float(e << 23));
  return static_cast<uint8_t>(e);
}

// Calls f(idx, y, k) for every slot of the row, after the block's scale byte went to `scales`.
template <typename T, int kPacks, typename F>
__device__ __forceinline__ void for_each_mx_block(const Row<T, kPacks>& row, int packs,
                                                  int64_t token, uint8_t* scales, SfLayout layout,
                                                  float max_code, F&& f) {
  constexpr int kElems = Pack<T>::kElems;
  static_assert(kElems == 8, "MX outputs take 16-bit activations");
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    const bool in = Row<T, kPacks>::has(j, packs);  // the same for the four threads of a block
    float y[kElems];
    const float m = row.template load_block_max<4>(j, in, y);  // the whole warp takes part
    if (!in) continue;
    float k;
    const uint8_t sf = mx_scale(m, max_code, k);
    const int idx = Row<T, kPacks>::index(j);
    if ((idx & 3) == 0) scales[layout.offset(token, idx / 4)] = sf;
    f(idx, y, k);
  }
}
}  // namespace detail

struct QuantMxfp8 {
  void* out;        // [token_num, hidden] of e4m3
  uint8_t* scales;  // SfLayout buffer, columns = hidden / 32
  SfLayout layout;

  template <typename T, int kPacks>
  __device__ __forceinline__ void operator()(const Row<T, kPacks>& row, int packs, int64_t base,
                                             int64_t token) const {
    constexpr int kElems = Pack<T>::kElems;
    detail::for_each_mx_block(row, packs, token, scales, layout, kE4m3Max,
                              [&](int idx, float (&y)[kElems], float k) {
#pragma unroll
                                for (int e = 0; e < kElems; ++e) y[e] *= k;
                                detail::store_e4m3<kElems>(out, base + idx, y);
                              });
  }
};

struct QuantMxfp4 {
  void* out;        // [token_num, hidden / 2] bytes
  uint8_t* scales;  // SfLayout buffer, columns = hidden / 32
  SfLayout layout;

  template <typename T, int kPacks>
  __device__ __forceinline__ void operator()(const Row<T, kPacks>& row, int packs, int64_t base,
                                             int64_t token) const {
    constexpr int kElems = Pack<T>::kElems;
    detail::for_each_mx_block(row, packs, token, scales, layout, 6.0f,
                              [&](int idx, float (&y)[kElems], float k) {
                                uint32_t codes = 0;
#pragma unroll
                                for (int e = 0; e < kElems; e += 2) {
                                  codes |= e2m1_pair(y[e] * k, y[e + 1] * k) << (4 * e);
                                }
                                reinterpret_cast<uint32_t*>(out)[base + idx] = codes;
                              });
  }
};

}  // namespace fusedcomm
