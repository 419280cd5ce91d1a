// cta_meet: block b of every rank meets block b of every other rank.
//
// The block first synchronises (so every thread's earlier reads and writes are done), then
// thread p < world serves peer p: it bumps the block's own count for p, stores the count into
// peer p's signal (slot [count & 1][block][own rank]) and waits, with acquire loads, until peer
// p has stored the same count into ours. The meeting is per block: blocks never wait on each
// other.
//
// kOrder is the order of the store:
//   MemOrder::kRelease - everything this block wrote before the call is visible to the peers'
//                        blocks after their call returns (use when peers read what we wrote);
//   MemOrder::kRelaxed - only "every thread of this block is done" (use when nothing is handed
//                        over, e.g. registered inputs at the start, or the end of a collective).
// Returns false if the wait gave up (see wait.cuh); all threads of the block get the same answer.
#pragma once
#include "fusedcomm/layout/peer_signal.cuh"
#include "fusedcomm/sync/wait.cuh"

namespace fusedcomm {

template <MemOrder kOrder>
__device__ __forceinline__ bool cta_meet(PeerSignal* self, PeerSignal* const* peers, int rank,
                                         int world, const WaitSite& site, int phase) {
  static_assert(kOrder != MemOrder::kAcquire, "pass kRelease or kRelaxed");
  __syncthreads();
  bool ok = true;
  const int p = threadIdx.x;
  if (p < world) {
    const uint32_t count = self->self_counter[blockIdx.x][p] + 1;
    flag_store<kOrder>(&peers[p]->peer_counter[count & 1][blockIdx.x][rank], count);
    ok = wait_flag_equals<MemOrder::kAcquire>(&self->peer_counter[count & 1][blockIdx.x][p], count, site, p,
                                 phase);
    self->self_counter[blockIdx.x][p] = count;
  }
  return __syncthreads_and(ok);
}

}  // namespace fusedcomm
