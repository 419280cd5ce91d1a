// Flags: 32-bit words that one GPU stores and another polls, with the memory order explicit.
//
// Use kRelaxed when the flag only says "I am here" and no data written before it is read
// after it (e.g. the end-of-collective meeting). Use kRelease on the store and kAcquire on the
// matching load when the poller reads data the storer wrote before the store (e.g. a staged
// input or a partial sum): the pair makes those writes visible, at system scope, to the poller.
#pragma once
#include "fusedcomm/common/ptx.cuh"

namespace fusedcomm {

enum class MemOrder { kRelaxed, kAcquire, kRelease };

template <MemOrder kOrder>
__device__ __forceinline__ uint32_t flag_load(const uint32_t* flag) {
  static_assert(kOrder != MemOrder::kRelease, "a load cannot release");
  if constexpr (kOrder == MemOrder::kAcquire) return ld_acquire_sys(flag);
  return ld_relaxed_sys(flag);
}

template <MemOrder kOrder>
__device__ __forceinline__ void flag_store(uint32_t* flag, uint32_t value) {
  static_assert(kOrder != MemOrder::kAcquire, "a store cannot acquire");
  if constexpr (kOrder == MemOrder::kRelease) {
    st_release_sys(flag, value);
  } else {
    st_relaxed_sys(flag, value);
  }
}

}  // namespace fusedcomm
