// Host stand-in for include/fusedcomm/common/ptx.cuh for the mixed-communication emulation: the
// DCP emulation's wrappers plus the 16-byte volatile accesses, as four relaxed 32-bit atomics
// (a Lamport reader waits until no element holds the sentinel, so a pack seen word by word is
// read only once every word has arrived).
#pragma once
#include "../../../dcp_a2a_host/fusedcomm/common/ptx.cuh"

namespace fusedcomm {

inline uint4 ld_volatile_v4(const void* p) {
  std::this_thread::yield();
  auto* w = static_cast<uint32_t*>(const_cast<void*>(p));
  uint4 v;
  v.x = std::atomic_ref<uint32_t>(w[0]).load(std::memory_order_relaxed);
  v.y = std::atomic_ref<uint32_t>(w[1]).load(std::memory_order_relaxed);
  v.z = std::atomic_ref<uint32_t>(w[2]).load(std::memory_order_relaxed);
  v.w = std::atomic_ref<uint32_t>(w[3]).load(std::memory_order_relaxed);
  return v;
}

inline void st_volatile_v4(void* p, uint4 v) {
  auto* w = static_cast<uint32_t*>(p);
  std::atomic_ref<uint32_t>(w[0]).store(v.x, std::memory_order_relaxed);
  std::atomic_ref<uint32_t>(w[1]).store(v.y, std::memory_order_relaxed);
  std::atomic_ref<uint32_t>(w[2]).store(v.z, std::memory_order_relaxed);
  std::atomic_ref<uint32_t>(w[3]).store(v.w, std::memory_order_relaxed);
}

}  // namespace fusedcomm
