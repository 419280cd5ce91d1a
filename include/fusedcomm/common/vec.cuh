// 16-byte packs: the unit every data mover loads, converts and stores.
//
// Pack<T> holds 16 bytes = kElems elements of T (8 for fp16/bf16, 4 for fp32). Loads and stores
// of whole packs compile to single 128-bit instructions; callers keep pointers 16-byte aligned.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fusedcomm {

template <typename T>
struct Pack {
  static constexpr int kElems = 16 / sizeof(T);
  uint4 raw;
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const void* base, int64_t index) {
  return Pack<T>{reinterpret_cast<const uint4*>(base)[index]};
}

template <typename T>
__device__ __forceinline__ void store_pack(void* base, int64_t index, const Pack<T>& p) {
  reinterpret_cast<uint4*>(base)[index] = p.raw;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// acc[i] = float(p[i])
template <typename T>
__device__ __forceinline__ void unpack_to(const Pack<T>& p, float (&acc)[Pack<T>::kElems]) {
  const T* e = reinterpret_cast<const T*>(&p.raw);
#pragma unroll
  for (int i = 0; i < Pack<T>::kElems; ++i) acc[i] = to_float(e[i]);
}

// acc[i] += float(p[i])
template <typename T>
__device__ __forceinline__ void accumulate(float (&acc)[Pack<T>::kElems], const Pack<T>& p) {
  const T* e = reinterpret_cast<const T*>(&p.raw);
#pragma unroll
  for (int i = 0; i < Pack<T>::kElems; ++i) acc[i] += to_float(e[i]);
}

// round each acc[i] to T (round to nearest even)
template <typename T>
__device__ __forceinline__ Pack<T> pack_from(const float (&acc)[Pack<T>::kElems]) {
  Pack<T> p;
  T* e = reinterpret_cast<T*>(&p.raw);
#pragma unroll
  for (int i = 0; i < Pack<T>::kElems; ++i) e[i] = from_float<T>(acc[i]);
  return p;
}

}  // namespace fusedcomm
