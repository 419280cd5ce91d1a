// FP8 E4M3 quantisers of a normalised row; both read the T-rounded row y (reference:
// python/fusedcomm/reference/fusion.py).
//
//   QuantFp8Static   q_j = e4m3(float(y_j) * inv), inv = 1 / scale_factor[0] (fp32, read on
//                    the device, so CUDA-graph replays see new values)
//   QuantFp8Dynamic  sigma = max(max_j |y_j| / 448, 2^-9 / 448) -> scale_out[token];
//                    q_j = e4m3(clamp(y_j / sigma, -448, 448))
// e4m3 is round-to-nearest-even with saturation to +-448 (__NV_SATFINITE, which is the clamp
// of the spec); NaN stays NaN.
#pragma once
#include <cuda_fp8.h>

#include "fusedcomm/proto/row.cuh"

namespace fusedcomm {

constexpr float kE4m3Max = 448.0f;
constexpr float kDynamicFp8MinScale = static_cast<float>(1.0 / 512.0 / 448.0);

namespace detail {
// Stores one pack's kElems values as kElems bytes of E4M3 at byte offset pack * kElems.
template <int kElems>
__device__ __forceinline__ void store_e4m3(void* out, int64_t pack, const float (&v)[kElems]) {
  uint32_t w[(kElems + 3) / 4] = {};
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    const uint32_t b = __nv_cvt_float_to_fp8(v[e], __NV_SATFINITE, __NV_E4M3);
    w[e / 4] |= b << (8 * (e % 4));
  }
  if constexpr (kElems == 8) {
    reinterpret_cast<uint2*>(out)[pack] = make_uint2(w[0], w[1]);
  } else {
    static_assert(kElems == 4, "packs hold 4 or 8 elements");
    reinterpret_cast<uint32_t*>(out)[pack] = w[0];
  }
}
}  // namespace detail

struct QuantFp8Static {
  void* out;  // [token_num, hidden] of e4m3
  float inv;  // 1 / scale_factor[0], computed once per block

  template <typename T, int kPacks>
  __device__ __forceinline__ void operator()(const Row<T, kPacks>& row, int packs,
                                             int64_t base) const {
    constexpr int kElems = Pack<T>::kElems;
    row.for_each_pack(packs, [&](int j, float (&y)[kElems]) {
#pragma unroll
      for (int e = 0; e < kElems; ++e) y[e] *= inv;
      detail::store_e4m3<kElems>(out, base + Row<T, kPacks>::index(j), y);
    });
  }
};

struct QuantFp8Dynamic {
  void* out;         // [token_num, hidden] of e4m3
  float* scale_out;  // [token_num] fp32

  template <typename T, int kPacks>
  __device__ __forceinline__ void operator()(const Row<T, kPacks>& row, int packs, int64_t base,
                                             int64_t token) const {
    constexpr int kElems = Pack<T>::kElems;
    float amax = 0.0f;
    row.for_each_pack(packs, [&](int, float (&y)[kElems]) {
#pragma unroll
      for (int e = 0; e < kElems; ++e) amax = fmaxf(amax, fabsf(y[e]));
    });
    const float sigma = fmaxf(block_max_abs(amax) / kE4m3Max, kDynamicFp8MinScale);
    if (threadIdx.x == 0) scale_out[token] = sigma;
    row.for_each_pack(packs, [&](int j, float (&y)[kElems]) {
#pragma unroll
      for (int e = 0; e < kElems; ++e) y[e] = y[e] / sigma;  // saturation = the clamp
      detail::store_e4m3<kElems>(out, base + Row<T, kPacks>::index(j), y);
    });
  }
};

}  // namespace fusedcomm
