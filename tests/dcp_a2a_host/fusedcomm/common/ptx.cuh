// Host stand-in for include/fusedcomm/common/ptx.cuh (tests/test_dcp_a2a_host.py): the same
// functions as C++ atomics with the same memory orders, each poll yielding the CPU.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

namespace fusedcomm {

inline uint64_t globaltimer_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline int32_t ld_volatile(const int32_t* p) {
  return std::atomic_ref<int32_t>(*const_cast<int32_t*>(p)).load(std::memory_order_relaxed);
}

inline uint32_t ld_relaxed_sys(const uint32_t* p) {
  std::this_thread::yield();
  return std::atomic_ref<uint32_t>(*const_cast<uint32_t*>(p)).load(std::memory_order_relaxed);
}

inline uint32_t ld_acquire_sys(const uint32_t* p) {
  std::this_thread::yield();
  return std::atomic_ref<uint32_t>(*const_cast<uint32_t*>(p)).load(std::memory_order_acquire);
}

inline void st_relaxed_sys(uint32_t* p, uint32_t v) {
  std::atomic_ref<uint32_t>(*p).store(v, std::memory_order_relaxed);
}

inline void st_release_sys(uint32_t* p, uint32_t v) {
  std::atomic_ref<uint32_t>(*p).store(v, std::memory_order_release);
}

}  // namespace fusedcomm
