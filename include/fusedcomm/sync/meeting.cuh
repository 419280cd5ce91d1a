// cta_meet: block b of every rank meets block b of every other rank.
//
// The block first synchronises (so every thread's earlier reads and writes are done), then
// thread p < world serves peer p: it counts the meeting (m = this block's meetings with p so
// far + 1), stores the value (m << 8 | tag) into peer p's slot [m & 1][block][own rank] and
// waits until peer p has stored the same value into ours; a failed communicator stores nothing
// and returns false. The tag names the meeting's phase and
// the algorithm, so a peer that reached the same meeting number in another phase or algorithm
// is reported as a mismatch instead of being taken for an arrival. Meetings are per block:
// blocks never wait on each other. Needs blockDim.x >= world.
//
// kOrder is the order of the store:
//   MemOrder::kRelease - everything this block wrote before the call is visible to the peers'
//                        blocks after their call returns (use when peers read what we wrote);
//   MemOrder::kRelaxed - only "every thread of this block is here" (registered inputs at the
//                        start, or the end of a collective).
// Returns false if the wait gave up (see wait.cuh); all threads of the block get the same answer.
#pragma once
#include "fusedcomm/layout/peer_signal.cuh"
#include "fusedcomm/sync/flag.cuh"

namespace fusedcomm {

__host__ __device__ constexpr uint32_t meeting_value(uint32_t m, uint32_t tag) {
  return (m << 8) | (tag & 0xffu);
}

template <MemOrder kOrder>
__device__ __forceinline__ bool cta_meet(PeerSignal* self, PeerSignal* const* peers,
                                         const FailureSite& site, uint32_t tag, int phase) {
  static_assert(kOrder != MemOrder::kAcquire, "pass kRelease or kRelaxed");
  __syncthreads();
  bool ok = true;
  const int p = threadIdx.x;
  if (p < site.world) {
    // Both loads are issued before either is used, so the claim check costs no extra latency.
    const uint32_t m = self->self_counter[blockIdx.x][p] + 1;
    const bool failed = site.failure.claim != nullptr && site.failed();
    const uint32_t want = meeting_value(m, tag);
    const uint32_t* slot = &self->peer_value[m & 1][blockIdx.x][p];
    ok = !failed;  // a failed communicator never announces an arrival
    if (ok) {
      flag_store<kOrder>(&peers[p]->peer_value[m & 1][blockIdx.x][site.rank], want);
      ok = wait_until(site, p, phase, want, [&](uint32_t& seen) {
        seen = flag_load<MemOrder::kAcquire>(slot);
        if (seen == want) return Poll::kReady;
        return (seen >> 8) == (want >> 8) ? Poll::kMismatch : Poll::kWait;
      });
    }
    if (ok) self->self_counter[blockIdx.x][p] = m;
  }
  return __syncthreads_and(ok);
}

}  // namespace fusedcomm
