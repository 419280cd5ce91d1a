// Launch arguments of the peer-to-peer (vLLM-style) all-reduce kernels.
//
// JIT-key / template arguments: T (fp32, fp16, bf16) and kWorld (2, 4, 8, or 0 = any world size
// up to kMaxRanks, read at run time). Everything here is a run-time argument.
#pragma once
#include "fusedcomm/layout/peer_signal.cuh"
#include "fusedcomm/sync/wait.cuh"

namespace fusedcomm {

// Threads per block (FC_ALLREDUCE_THREADS overrides it when tuning).
#ifndef FC_ALLREDUCE_THREADS
#define FC_ALLREDUCE_THREADS 512
#endif
constexpr int kAllReduceMaxThreads = FC_ALLREDUCE_THREADS;

struct AllReduceArgs {
  const RankPointers* inputs;  // device record: inputs->ptrs[q] = rank q's input, mapped here
  const void* stage_from;      // non-null: first copy this rank's input from here into ptrs[rank]
  void* out;
  PeerSignal* self;
  PeerSignal* peers[kMaxRanks];
  int64_t num_packs;           // 16-byte packs in the message
  int32_t rank;
  int32_t world;
  WaitSite site;
};

template <int kWorld>
__device__ __forceinline__ int world_of(const AllReduceArgs& a) {
  return kWorld > 0 ? kWorld : a.world;
}

// Rank-count bound for unrolled loops: the exact count when specialised, else the maximum.
template <int kWorld>
constexpr int kRankSlots = kWorld > 0 ? kWorld : kMaxRanks;

}  // namespace fusedcomm
