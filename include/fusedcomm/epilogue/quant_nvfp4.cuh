// QuantNvfp4: NVFP4 quantiser of a normalised row, 16-element blocks (reference:
// python/fusedcomm/reference/quant.py).
//
// Per block b (two neighbouring packs, held by threads 2i and 2i+1 of the block: the row's
// slots are strided by blockDim.x, which is even, so a block never straddles two slots):
//   m   = max |y_j| over the block (T values, exact)
//   sf  = e4m3(G * (m * (1/6)))                        the stored scale byte (SfLayout)
//   k   = sf != 0 ? G / float(sf) : 0
//   q_j = e2m1(float(y_j) * k), two codes per byte     (common/e2m1.cuh)
// G is the global scale (scale_factor[0], read on the device). Each thread stores its pack's
// 4 code bytes; the even thread of a pair stores the scale byte. Needs T of 16 bits.
#pragma once
#include <cuda_fp8.h>

#include "fusedcomm/common/e2m1.cuh"
#include "fusedcomm/layout/quant_scales.cuh"
#include "fusedcomm/proto/row.cuh"

namespace fusedcomm {

struct QuantNvfp4 {
  void* out;        // [token_num, hidden / 2] bytes
  uint8_t* scales;  // SfLayout buffer
  SfLayout layout;  // columns = hidden / 16
  float global;     // G

  template <typename T, int kPacks>
  __device__ __forceinline__ void operator()(const Row<T, kPacks>& row, int packs, int64_t base,
                                             int64_t token) const {
    constexpr int kElems = Pack<T>::kElems;
    static_assert(kElems == 8, "NVFP4 takes 16-bit activations");
#pragma unroll
    for (int j = 0; j < kPacks; ++j) {
      const bool in = Row<T, kPacks>::has(j, packs);  // the same for both threads of a pair
      float y[kElems];
      const float m = row.template load_block_max<2>(j, in, y);  // the whole warp takes part
      if (!in) continue;
      const __nv_fp8_storage_t sf =
          __nv_cvt_float_to_fp8(global * (m * (1.0f / 6.0f)), __NV_SATFINITE, __NV_E4M3);
      const float sf_value = __half2float(__half(__nv_cvt_fp8_to_halfraw(sf, __NV_E4M3)));
      const float k = sf_value != 0.0f ? __fdiv_rn(global, sf_value) : 0.0f;
      uint32_t codes = 0;
#pragma unroll
      for (int e = 0; e < kElems; e += 2) codes |= e2m1_pair(y[e] * k, y[e + 1] * k) << (4 * e);
      const int idx = Row<T, kPacks>::index(j);
      reinterpret_cast<uint32_t*>(out)[base + idx] = codes;
      if ((idx & 1) == 0) scales[layout.offset(token, idx / 2)] = sf;
    }
  }
};

}  // namespace fusedcomm
