// Lamport cells: a cell is empty while it holds negative zero of the buffer's element type.
//
// Writers never send -0.0 (lamport_sanitize turns it into +0.0), so a reader knows a 16-byte
// pack has arrived as soon as none of its elements holds the sentinel. Compare bits, never
// floats: -0.0 == +0.0 as floats.
#pragma once
#include <cstdint>

#include "fusedcomm/common/vec.cuh"

namespace fusedcomm {

// 32-bit word holding the sentinel in every element of `elem_bytes` width (2 or 4).
__host__ __device__ constexpr uint32_t lamport_empty_word(int elem_bytes) {
  return elem_bytes == 2 ? 0x80008000u : 0x80000000u;
}

template <typename T>
__device__ __forceinline__ bool lamport_word_has_empty(uint32_t w) {
  if constexpr (sizeof(T) == 2) {
    return (w & 0xffffu) == 0x8000u || (w >> 16) == 0x8000u;
  } else {
    return w == 0x80000000u;
  }
}

// True while any element of the pack still holds the sentinel.
template <typename T>
__device__ __forceinline__ bool lamport_has_empty(const Pack<T>& p) {
  return lamport_word_has_empty<T>(p.raw.x) || lamport_word_has_empty<T>(p.raw.y) ||
         lamport_word_has_empty<T>(p.raw.z) || lamport_word_has_empty<T>(p.raw.w);
}

template <typename T>
__device__ __forceinline__ uint32_t lamport_sanitize_word(uint32_t w) {
  if constexpr (sizeof(T) == 2) {
    if ((w & 0xffffu) == 0x8000u) w &= 0xffff0000u;
    if ((w >> 16) == 0x8000u) w &= 0x0000ffffu;
    return w;
  } else {
    return w == 0x80000000u ? 0u : w;
  }
}

// The pack with every -0.0 replaced by +0.0 (the only value a writer may not send).
template <typename T>
__device__ __forceinline__ Pack<T> lamport_sanitize(Pack<T> p) {
  p.raw.x = lamport_sanitize_word<T>(p.raw.x);
  p.raw.y = lamport_sanitize_word<T>(p.raw.y);
  p.raw.z = lamport_sanitize_word<T>(p.raw.z);
  p.raw.w = lamport_sanitize_word<T>(p.raw.w);
  return p;
}

}  // namespace fusedcomm
