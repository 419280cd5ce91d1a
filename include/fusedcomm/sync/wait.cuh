// wait_until: the one spin loop in fusedcomm. Every wait for a peer goes through it.
//
// A FailureSite says on whose behalf a kernel waits: the communicator's FailureState, the
// abort marks of every rank (marks[q][p] != 0: rank p gave up; marks[q] is rank q's copy,
// mapped here), the timeout and the op. wait_until(site, peer, phase, ready) calls `ready`
// until it returns true, and gives up, returning false, when
//   - this communicator failed here meanwhile (another block claimed it),
//   - `peer` has marked that it gave up (kFailurePeerAborted),
//   - `ready` reports a value that cannot become right (kFailureMismatch), or
//   - more than site.timeout_ns nanoseconds pass (kFailureTimeout).
// Giving up for one of the last three reasons claims the FailureState, fills its record and
// marks every peer, so that a rank that gives up never leaves a peer waiting or computing on
// stale data. The caller must then leave the kernel (after __syncthreads_and on the result).
// A site with no FailureState prints the same facts and traps.
//
// Any type with the members and methods of FailureSite can be a site (wait_until and
// record_failure are templates): FailureSite keeps the abort marks in a table of W mapped
// pointers; a family whose peers' memory lies at one stride (the MoE all-to-all rows) keeps
// them in those rows (kernels/moe_a2a_args.cuh).
#pragma once
#include <cstdio>

#include "fusedcomm/common/failure.cuh"
#include "fusedcomm/common/ptx.cuh"

namespace fusedcomm {

constexpr int kMaxRanks = 8;

enum class Poll { kWait, kReady, kMismatch };

struct FailureSite {
  FailureState failure;
  uint32_t* marks[kMaxRanks];  // marks[q]: rank q's abort marks (kMaxRanks words), mapped here
  uint64_t timeout_ns;
  int32_t op;
  int32_t rank;
  int32_t world;

  __device__ __forceinline__ bool failed() const { return ld_volatile(failure.claim) != 0; }
  __device__ __forceinline__ bool peer_gave_up(int peer) const {
    return ld_relaxed_sys(&marks[rank][peer]) != 0;
  }
  // Tell every peer that this rank gave up.
  __device__ void mark_peers() const {
    for (int q = 0; q < world; ++q) {
      if (q != rank) st_relaxed_sys(&marks[q][rank], 1u);
    }
  }
};

template <typename Site>
__device__ __noinline__ void record_failure(const Site& site, int32_t code, int peer, int phase,
                                            uint32_t expected, uint32_t observed,
                                            uint64_t waited_ns) {
  if (site.failure.claim == nullptr) {
    printf(
        "fusedcomm: op %d rank %d: gave up on rank %d (code %d, phase %d, block %d, expected "
        "%u, observed %u, %llu ns)\n",
        site.op, site.rank, peer, code, phase, blockIdx.x, expected, observed,
        (unsigned long long)waited_ns);
    __trap();
  }
  if (atomicCAS(site.failure.claim, 0, 1) != 0) return;
  site.mark_peers();
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
  *reinterpret_cast<volatile int32_t*>(&r->code) = code;
  __threadfence_system();
}

// `ready(observed)` polls once: it returns kReady, kWait or kMismatch and stores the word it saw
// in `observed` (for the record). Use relaxed or acquire loads (or volatile 16-byte loads) in
// it, never plain loads the compiler may hoist out of the loop.
//
// The claim is not re-read before the first poll: a caller checks it before its first store of
// a call (kernel entry, or overlapped with the meeting's own loads in cta_meet), and a claim set
// by another block while this one waits is seen at the next periodic check.
template <typename Site, typename Ready>
__device__ __forceinline__ bool wait_until(const Site& site, int peer, int phase, uint32_t expected,
                                           Ready&& ready) {
  uint32_t observed = 0;
  Poll p = ready(observed);
  if (p == Poll::kReady) return true;
  const uint64_t start = globaltimer_ns();
  for (uint32_t spins = 1;; ++spins) {
    if (p == Poll::kMismatch) {
      record_failure(site, kFailureMismatch, peer, phase, expected, observed,
                     globaltimer_ns() - start);
      return false;
    }
    if ((spins & 255u) == 0) {
      if (site.failure.claim != nullptr && site.failed()) return false;
      const uint64_t waited = globaltimer_ns() - start;
      if (site.peer_gave_up(peer)) {
        record_failure(site, kFailurePeerAborted, peer, phase, expected, observed, waited);
        return false;
      }
      if (waited > site.timeout_ns) {
        record_failure(site, kFailureTimeout, peer, phase, expected, observed, waited);
        return false;
      }
    }
    p = ready(observed);
    if (p == Poll::kReady) return true;
  }
}

}  // namespace fusedcomm
