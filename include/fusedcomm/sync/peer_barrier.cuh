// cta_meet: block b of every rank meets block b of every other rank.
//
// Thread p < world serves peer p: it bumps the block's own count for p, stores the count into
// peer p's signal (slot [count & 1][block][own rank]) and waits until peer p has stored the same
// count into ours. The meeting is per block, so blocks never wait on each other.
//
// kOrder picks what the meeting guarantees:
//   MemOrder::kRelease - everything this block wrote before the call is visible to the peers'
//                        blocks after their call returns (use when peers read what we wrote);
//   MemOrder::kRelaxed - only that every peer block has arrived (use when nothing is handed over).
// Returns false if the wait gave up (see wait.cuh); all threads of the block get the same answer.
#pragma once
#include "fusedcomm/layout/peer_signal.cuh"
#include "fusedcomm/sync/wait.cuh"

namespace fusedcomm {

template <MemOrder kOrder>
__device__ __forceinline__ bool cta_meet(PeerSignal* self, PeerSignal* const* peers, int rank,
                                         int world, const WaitSite& site, int phase) {
  static_assert(kOrder != MemOrder::kAcquire, "pass kRelease or kRelaxed");
  constexpr MemOrder kLoad = kOrder == MemOrder::kRelease ? MemOrder::kAcquire : MemOrder::kRelaxed;
  if constexpr (kOrder == MemOrder::kRelease) __syncthreads();
  bool ok = true;
  const int p = threadIdx.x;
  if (p < world) {
    const uint32_t count = self->self_counter[blockIdx.x][p] + 1;
    flag_store<kOrder>(&peers[p]->peer_counter[count & 1][blockIdx.x][rank], count);
    ok = wait_flag_equals<kLoad>(&self->peer_counter[count & 1][blockIdx.x][p], count, site, p,
                                 phase);
    self->self_counter[blockIdx.x][p] = count;
  }
  return __syncthreads_and(ok);
}

}  // namespace fusedcomm
