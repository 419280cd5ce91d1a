// Lamport data movers: data that marks its own arrival.
//
//   lamport_push(dst, i, pack)   store a sanitised pack into a peer's (or our own) Lamport cell;
//   lamport_pull(site, ...)      bounded wait until a cell holds no sentinel, then return it;
//   lamport_clear(dst, i, ...)   put the sentinel back, ready for a later call.
// There is no meeting: a reader polls the cells themselves with volatile 16-byte loads, so a
// value is read exactly when it has arrived. Writers must never write a cell a reader may still
// be polling for an earlier call (the caller's buffer rotation guarantees it).
#pragma once
#include "fusedcomm/sync/lamport.cuh"
#include "fusedcomm/sync/wait.cuh"

namespace fusedcomm {

template <typename T>
__device__ __forceinline__ void lamport_push(void* dst, int64_t index, const Pack<T>& p) {
  st_volatile_v4(reinterpret_cast<uint4*>(dst) + index, lamport_sanitize(p).raw);
}

template <typename T>
__device__ __forceinline__ void lamport_clear(void* dst, int64_t index) {
  const uint32_t e = lamport_empty_word(sizeof(T));
  reinterpret_cast<uint4*>(dst)[index] = make_uint4(e, e, e, e);
}

// Waits (bounded, see wait.cuh) until pack `index` of `src` has arrived from `peer`; returns
// false if the wait gave up (then `out` is unspecified).
template <typename T, typename Site = FailureSite>
__device__ __forceinline__ bool lamport_pull(const Site& site, int peer, int phase, const void* src,
                                             int64_t index, Pack<T>& out) {
  const uint4* cell = reinterpret_cast<const uint4*>(src) + index;
  return wait_until(site, peer, phase, lamport_empty_word(sizeof(T)), [&](uint32_t& seen) {
    out.raw = ld_volatile_v4(cell);
    seen = out.raw.x;
    return lamport_has_empty(out) ? Poll::kWait : Poll::kReady;
  });
}

}  // namespace fusedcomm
