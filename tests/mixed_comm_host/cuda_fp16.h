// Host stand-in for CUDA's fp16 type (the emulation runs bf16 only; this makes vec.cuh compile).
#pragma once
struct __half {
  _Float16 v;
};
inline float __half2float(__half x) { return static_cast<float>(x.v); }
inline __half __float2half_rn(float x) { return __half{static_cast<_Float16>(x)}; }
