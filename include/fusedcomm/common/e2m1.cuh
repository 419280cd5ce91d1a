// E2M1 (FP4) codes: two per byte, element 2i in the low nibble (reference:
// python/fusedcomm/reference/quant.py).
//
//   e2m1_pair(lo, hi) -> the byte code(lo) | code(hi) << 4
// code = sign bit (bit 3) | index of |x| rounded to the nearest of 0, .5, 1, 1.5, 2, 3, 4, 6
// (ties to the even index; above 6 saturates). SM100-family targets use the hardware
// conversion; every other target uses the exact software encoder below, which gives the same
// bytes (fusedcomm.reference.quant.e2m1_encode is the reference of both).
#pragma once
#include <cstdint>

namespace fusedcomm {

__device__ __forceinline__ uint32_t e2m1_code(float x) {
  if (x != x) return 7u;  // NaN is outside the contract; the reference maps it to +6
  const float a = fabsf(x);
  const uint32_t index = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) +
                         (a >= 3.5f) + (a > 5.0f);
  return (signbit(x) ? 8u : 0u) | index;
}

#if defined(__CUDA_ARCH_FEAT_SM100_ALL) || defined(__CUDA_ARCH_FEAT_SM103_ALL) || \
    defined(__CUDA_ARCH_FEAT_SM120_ALL)
#define FUSEDCOMM_NATIVE_E2M1 1
#endif

__device__ __forceinline__ uint32_t e2m1_pair(float lo, float hi) {
#ifdef FUSEDCOMM_NATIVE_E2M1
  uint32_t out;
  asm("{\n .reg .b8 b;\n cvt.rn.satfinite.e2m1x2.f32 b, %2, %1;\n cvt.u32.u8 %0, b;\n}"
      : "=r"(out)
      : "f"(lo), "f"(hi));
  return out;
#else
  return e2m1_code(lo) | (e2m1_code(hi) << 4);
#endif
}

}  // namespace fusedcomm
