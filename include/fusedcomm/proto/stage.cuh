// stage_packs: copy a range of 16-byte packs, kUnroll loads in flight per thread.
//
// Thread t of a grid-stride loop copies packs first, first + stride, ... below n; every caller
// uses the same (first, stride) for the same data, so the packs a block stages are the packs
// that block (and the same block of every peer) later reads.
#pragma once
#include "fusedcomm/common/vec.cuh"

namespace fusedcomm {

template <int kUnroll>
__device__ __forceinline__ void stage_packs(void* dst, const void* src, int64_t first,
                                            int64_t stride, int64_t n) {
  for (int64_t base = first; base < n; base += stride * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * stride < n) v[u] = reinterpret_cast<const uint4*>(src)[base + u * stride];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * stride < n) reinterpret_cast<uint4*>(dst)[base + u * stride] = v[u];
    }
  }
}

}  // namespace fusedcomm
