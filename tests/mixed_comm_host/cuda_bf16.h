// Host stand-in for CUDA's bf16 type: the top 16 bits of an fp32, rounded to nearest even.
#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 x) {
  const uint32_t w = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t w;
  std::memcpy(&w, &f, 4);
  if ((w & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fc0};
  w += 0x7fffu + ((w >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(w >> 16)};
}
