// RmsNorm: RMS normalisation of a row with fp32 statistics (reference:
// python/fusedcomm/reference/fusion.py).
//
//   ms = sum_j float(p_j)^2 / hidden;  rstd = rsqrt(ms + eps)
//   y_j = rd_T((float(p_j) * rstd) * (weight_bias + float(gamma_j)))
// The row becomes y (rounded to T, which the quantisers then read); y is also stored to `out`
// unless it is null (patterns without norm_out). weight_bias 0: standard RMSNorm; 1: Gemma.
#pragma once
#include "fusedcomm/proto/row.cuh"

namespace fusedcomm {

struct RmsNorm {
  const void* gamma;  // [hidden] of T
  void* out;          // [token_num, hidden] of T, or null
  float eps;
  float weight_bias;
  int hidden;

  template <typename T, int kPacks>
  __device__ __forceinline__ void operator()(Row<T, kPacks>& row, int packs, int64_t base) const {
    constexpr int kElems = Pack<T>::kElems;
    float ss = 0.0f;
    row.for_each_pack(packs, [&](int, float (&p)[kElems]) {
#pragma unroll
      for (int e = 0; e < kElems; ++e) ss += p[e] * p[e];
    });
    const float rstd = rsqrtf(block_sum(ss) / static_cast<float>(hidden) + eps);
    row.for_each_pack(packs, [&](int j, float (&p)[kElems]) {
      const int idx = Row<T, kPacks>::index(j);
      float g[kElems];
      unpack_to(load_pack<T>(gamma, idx), g);
#pragma unroll
      for (int e = 0; e < kElems; ++e) p[e] = (p[e] * rstd) * (weight_bias + g[e]);
      row.v[j] = pack_from<T>(p);
      if (out != nullptr) store_pack<T>(out, base + idx, row.v[j]);
    });
  }
};

}  // namespace fusedcomm
