// A token row held in registers by one thread block, and the block reductions over it.
//
// Row<T, kPacks>: thread t of a block of B threads holds packs t, t + B, ..., t + (kPacks-1)*B
// of a row of `packs` 16-byte packs (packs <= kPacks * B); Row::has(j, packs) says whether slot
// j is inside the row; row.for_each_pack visits those slots as floats. Every thread of the
// block must call block_sum / block_max (they synchronise the block) with the same control flow.
#pragma once
#include "fusedcomm/common/vec.cuh"

namespace fusedcomm {

template <typename T, int kPacks>
struct Row {
  Pack<T> v[kPacks];

  __device__ __forceinline__ static int index(int j) { return j * blockDim.x + threadIdx.x; }
  __device__ __forceinline__ static bool has(int j, int packs) { return index(j) < packs; }

  // Calls f(j, y) for every slot j inside the row, y = v[j] as kElems floats (a copy: to
  // change the row, f writes v[j] itself).
  template <typename F>
  __device__ __forceinline__ void for_each_pack(int packs, F&& f) const {
#pragma unroll
    for (int j = 0; j < kPacks; ++j) {
      if (!has(j, packs)) continue;
      float y[Pack<T>::kElems];
      unpack_to(v[j], y);
      f(j, y);
    }
  }

  // Slot j as floats in y (zeros when it is outside the row) and the largest |y| over the
  // kLanes neighbouring threads that share one scale block (kLanes a power of two <= 32).
  // Every thread of the warp must call it, inside the row or not.
  template <int kLanes>
  __device__ __forceinline__ float load_block_max(int j, bool in,
                                                  float (&y)[Pack<T>::kElems]) const {
    if (in) {
      unpack_to(v[j], y);
    } else {
#pragma unroll
      for (int e = 0; e < Pack<T>::kElems; ++e) y[e] = 0.0f;
    }
    float m = 0.0f;
#pragma unroll
    for (int e = 0; e < Pack<T>::kElems; ++e) m = fmaxf(m, fabsf(y[e]));
#pragma unroll
    for (int lane = 1; lane < kLanes; lane <<= 1)
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, lane));
    return m;
  }
};

namespace detail {
template <bool kMax>
__device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, m);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  return v;
}

// Block-wide sum or max of one float per thread; every thread gets the result. Needs
// blockDim.x to be a multiple of 32.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v) {
  __shared__ float partial[32];
  __shared__ float result;
  v = warp_reduce<kMax>(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // a previous call may still read `result`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    float w = lane < warps ? partial[lane] : 0.0f;  // 0 is neutral for sum and max of |x|
    w = warp_reduce<kMax>(w);
    if (lane == 0) result = w;
  }
  __syncthreads();
  return result;
}
}  // namespace detail

// Sum over the block (order unspecified but fixed for a given block size).
__device__ __forceinline__ float block_sum(float v) { return detail::block_reduce<false>(v); }

// Max over the block of non-negative values (absolute values).
__device__ __forceinline__ float block_max_abs(float v) { return detail::block_reduce<true>(v); }

}  // namespace fusedcomm
