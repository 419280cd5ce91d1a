// wait_flag_equals: the one spin loop in fusedcomm. Every wait for a peer goes through it.
//
// It polls `flag` until it equals `expected`. It gives up, returning false, when
//   - more than site.timeout_ns nanoseconds pass: the first waiter to give up (over all blocks
//     and launches) claims the FailureState and records op, rank, peer, phase, block, the
//     expected and last observed value, and the time waited; or
//   - another waiter has already claimed the FailureState: a lost peer stops every wait.
// The caller must then leave the kernel (usually after __syncthreads_and on the result).
// No recording state (site.failure.claim == nullptr) means: print the same facts and trap.
#pragma once
#include <cstdio>

#include "fusedcomm/common/status.cuh"
#include "fusedcomm/sync/flag.cuh"

namespace fusedcomm {

struct WaitSite {
  FailureState failure;
  uint64_t timeout_ns;
  int32_t op;
  int32_t rank;
  int32_t world;
};

__device__ __forceinline__ void record_failure(const WaitSite& site, int peer, int phase,
                                               uint32_t expected, uint32_t observed,
                                               uint64_t waited_ns) {
  if (site.failure.claim == nullptr) {
    printf("fusedcomm: op %d rank %d: rank %d did not arrive within %llu ns (phase %d, block %d,"
           " expected %u, observed %u)\n",
           site.op, site.rank, peer, (unsigned long long)site.timeout_ns, phase, blockIdx.x,
           expected, observed);
    __trap();
  }
  if (atomicCAS(site.failure.claim, 0, 1) != 0) return;
  FailureRecord* r = site.failure.record;
  r->op = site.op;
  r->rank = site.rank;
  r->peer = peer;
  r->phase = phase;
  r->block = blockIdx.x;
  r->expected = expected;
  r->observed = observed;
  r->waited_ns = waited_ns;
  r->timeout_ns = site.timeout_ns;
  r->world = site.world;
  __threadfence_system();
  *reinterpret_cast<volatile int32_t*>(&r->code) = kFailureTimeout;
  __threadfence_system();
}

template <MemOrder kOrder>
__device__ __forceinline__ bool wait_flag_equals(const uint32_t* flag, uint32_t expected,
                                                 const WaitSite& site, int peer, int phase) {
  uint32_t observed = flag_load<kOrder>(flag);
  if (observed == expected) return true;
  const uint64_t start = globaltimer_ns();
  for (uint32_t spins = 1;; ++spins) {
    observed = flag_load<kOrder>(flag);
    if (observed == expected) return true;
    if ((spins & 1023u) != 0) continue;
    if (site.failure.claim != nullptr &&
        *reinterpret_cast<volatile int32_t*>(site.failure.claim) != 0) {
      return false;
    }
    const uint64_t waited = globaltimer_ns() - start;
    if (waited > site.timeout_ns) {
      record_failure(site, peer, phase, expected, observed, waited);
      return false;
    }
  }
}

}  // namespace fusedcomm
