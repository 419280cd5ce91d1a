// Call announcements: how a rank that waits on a peer's data tells "late" from "different".
//
//   announce_call(peers_flags, rank, world, word)  store our call word (layout/fusion_
//                                                  workspace.cuh) into every peer's flags
//   lamport_pull_announced(site, peer, phase, src, index, out, own_flags, word)
//       lamport_pull (proto/lamport.cuh) that also reports kFailureMismatch when `peer` has
//       announced the same call number with another algorithm (it will never write our cell).
//       Our own slot (peer == site.rank, filled by our own blocks) has no announcement: it is
//       only waited for.
// Announcements are relaxed stores: they carry no data, only "which call, which algorithm".
#pragma once
#include "fusedcomm/layout/fusion_workspace.cuh"
#include "fusedcomm/sync/flag.cuh"
#include "fusedcomm/sync/lamport.cuh"
#include "fusedcomm/sync/wait.cuh"

namespace fusedcomm {

// One thread calls it; `flags[q]` is rank q's flags buffer mapped here.
__device__ __forceinline__ void announce_call(FusionFlags* const* flags, int rank, int world,
                                              uint32_t word) {
  for (int q = 0; q < world; ++q) {
    if (q != rank) flag_store<MemOrder::kRelaxed>(&flags[q]->announce[rank], word);
  }
}

// True when `seen` (a peer's announcement) is our call number with another algorithm.
__device__ __forceinline__ bool announced_other(uint32_t seen, uint32_t word) {
  return (seen >> 8) == (word >> 8) && seen != word;
}

template <typename T>
__device__ __forceinline__ bool lamport_pull_announced(const FailureSite& site, int peer, int phase,
                                                       const void* src, int64_t index, Pack<T>& out,
                                                       const FusionFlags* own_flags,
                                                       uint32_t word) {
  const uint4* cell = reinterpret_cast<const uint4*>(src) + index;
  const uint32_t* announced = &own_flags->announce[peer];
  return wait_until(site, peer, phase, word, [&](uint32_t& seen) {
    out.raw = ld_volatile_v4(cell);
    if (!lamport_has_empty(out)) return Poll::kReady;
    if (peer == site.rank) return Poll::kWait;
    seen = flag_load<MemOrder::kRelaxed>(announced);
    return announced_other(seen, word) ? Poll::kMismatch : Poll::kWait;
  });
}

}  // namespace fusedcomm
