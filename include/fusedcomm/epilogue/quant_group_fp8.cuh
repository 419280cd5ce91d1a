// QuantFp8Group: per-token-group FP8 E4M3 of a normalised row with UE8M0 scales (reference:
// python/fusedcomm/reference/quant.py).
//
// For group k of g consecutive values of row t (g > 0 divides hidden; any g, also groups that
// straddle or share a 16-byte pack):
//   a = max |y_j| over the group;  s = max(a / 448, 1e-10) rounded up to a power of two
//   q_j = e4m3(clamp(y_j / s, -448, 448))       (y_j times the exact inverse of s)
//   byte k%4 of word (k/4)*M + t of scale_out = bits(s) >> 23      (PackedUe8m0)
// Unused bytes of a row's last word are 0; the block of the last token also writes 0 into the
// padding rows [N, M) of every word column but the last (which lies outside the storage).
// Group maxima meet in shared memory (kMaxQuantGroups per row; the host checks).
#pragma once
#include "fusedcomm/epilogue/quant_fp8.cuh"
#include "fusedcomm/layout/quant_scales.cuh"

namespace fusedcomm {

constexpr int kMaxQuantGroups = 8192;
constexpr float kGroupFp8MinScale = 1e-10f;

namespace detail {
// Calls f(e, group) for the kElems elements of pack `idx`, with the group index of each,
// without a division per element (at most one group boundary between neighbours).
template <int kElems, typename F>
__device__ __forceinline__ void for_each_group_elem(int idx, int group, F&& f) {
  const int first = idx * kElems;
  int k = first / group;
  int end = (k + 1) * group;
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    if (first + e >= end) {
      ++k;
      end += group;
    }
    f(e, k);
  }
}

// The smallest power of two >= s (positive, normal): bump the exponent if any mantissa bit is set.
__device__ __forceinline__ float round_up_pow2(float s) {
  const uint32_t b = __float_as_uint(s);
  return (b & 0x7fffffu) ? __uint_as_float((b & 0x7f800000u) + 0x800000u) : s;
}
// 1 / s for a power of two s in the normal range, exact (so y * (1/s) is y / s, rounded once).
__device__ __forceinline__ float pow2_inverse(float s) {
  return __uint_as_float((254u << 23) - (__float_as_uint(s) & 0x7f800000u));
}
}  // namespace detail

struct QuantFp8Group {
  void* out;           // [token_num, hidden] of e4m3
  int32_t* scales;     // PackedUe8m0 storage
  PackedUe8m0 layout;  // rows = token_num, groups = hidden / group
  int32_t group;

  template <typename T, int kPacks>
  __device__ __forceinline__ void operator()(const Row<T, kPacks>& row, int packs, int64_t base,
                                             int64_t token) const {
    constexpr int kElems = Pack<T>::kElems;
    __shared__ float scale[kMaxQuantGroups];  // group maxima, then group scales
    const int groups = layout.groups;
    __syncthreads();  // the previous row (two-shot) has finished reading `scale`
    for (int k = threadIdx.x; k < groups; k += blockDim.x) scale[k] = 0.0f;
    __syncthreads();
    row.for_each_pack(packs, [&](int j, float (&y)[kElems]) {
      int current = -1;
      float m = 0.0f;
      detail::for_each_group_elem<kElems>(Row<T, kPacks>::index(j), group, [&](int e, int k) {
        if (k != current) {
          if (current >= 0) atomicMax(reinterpret_cast<int*>(&scale[current]), __float_as_int(m));
          current = k;
          m = 0.0f;
        }
        m = fmaxf(m, fabsf(y[e]));
      });
      atomicMax(reinterpret_cast<int*>(&scale[current]), __float_as_int(m));  // |y| >= 0: int order
    });
    __syncthreads();
    for (int k = threadIdx.x; k < groups; k += blockDim.x) {
      scale[k] = detail::round_up_pow2(fmaxf(__fdiv_rn(scale[k], kE4m3Max), kGroupFp8MinScale));
    }
    __syncthreads();
    const int words = layout.packs();
    for (int w = threadIdx.x; w < words; w += blockDim.x) {
      uint32_t word = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int k = 4 * w + b;
        if (k < groups) word |= (__float_as_uint(scale[k]) >> 23) << (8 * b);
      }
      scales[layout.word(token, w)] = static_cast<int32_t>(word);
      if (token == layout.rows - 1 && w < words - 1) {
        for (int64_t t = layout.rows; t < layout.lead(); ++t) scales[layout.word(t, w)] = 0;
      }
    }
    row.for_each_pack(packs, [&](int j, float (&y)[kElems]) {
      const int idx = Row<T, kPacks>::index(j);
      detail::for_each_group_elem<kElems>(
          idx, group, [&](int e, int k) { y[e] *= detail::pow2_inverse(scale[k]); });
      detail::store_e4m3<kElems>(out, base + idx, y);
    });
  }
};

}  // namespace fusedcomm
