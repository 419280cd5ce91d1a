// What the DCP all-to-all kernel needs of CUDA, on the host: every thread of a block is a
// std::thread, __syncthreads a std::barrier of the block, fences C++ fences.
#pragma once
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>  // (the standard headers emulate.cpp uses come before the macros below)

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};

struct EmulatedBlock {
  std::barrier<>* barrier;
  std::atomic<bool> any_false{false};
};

inline thread_local dim3 threadIdx, blockIdx;
inline thread_local EmulatedBlock* this_block;
inline dim3 blockDim;  // set before any block starts

inline void __syncthreads() { this_block->barrier->arrive_and_wait(); }

inline bool __syncthreads_and(bool p) {
  __syncthreads();
  if (!p) this_block->any_false.store(true);
  __syncthreads();
  const bool all = !this_block->any_false.load();
  __syncthreads();
  if (threadIdx.x == 0) this_block->any_false.store(false);
  __syncthreads();
  return all;
}

#if defined(__SANITIZE_THREAD__)
inline void __threadfence_system() {}  // the release stores order everything TSan checks
#else
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
#endif

[[noreturn]] inline void __trap() { std::abort(); }

inline int atomicCAS(int* p, int compare, int value) {
  std::atomic_ref<int>(*p).compare_exchange_strong(compare, value);
  return compare;
}

template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
