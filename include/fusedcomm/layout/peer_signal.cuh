// The signal header at the start of every rank's meta buffer (vLLM-style all-reduce).
//
//   self_counter[block][peer]            how many meetings this rank's block had with `peer`
//   peer_value[parity][block][peer]      written by `peer`: its meeting value (see meeting.cuh)
//   abort_mark[peer]                     written by `peer` when it gave up (see sync/wait.cuh)
// Two parities let consecutive meetings alternate slots, so a fast rank's next arrival never
// overwrites a value a slow rank has not read yet. Scratch space for the two-shot partial sums
// follows the header directly.
#pragma once
#include <cstdint>

#include "fusedcomm/sync/wait.cuh"

namespace fusedcomm {

constexpr int kMaxBlocks = 36;

struct PeerSignal {
  alignas(128) uint32_t self_counter[kMaxBlocks][kMaxRanks];
  alignas(128) uint32_t peer_value[2][kMaxBlocks][kMaxRanks];
  alignas(128) uint32_t abort_mark[kMaxRanks];
};
static_assert(sizeof(PeerSignal) % 128 == 0, "scratch after the header stays 128-byte aligned");

__host__ __device__ inline char* scratch_after(PeerSignal* signal) {
  return reinterpret_cast<char*>(signal) + sizeof(PeerSignal);
}

// One pointer record: where each rank's copy of one shared buffer lives in this process.
struct alignas(64) RankPointers {
  const void* ptrs[kMaxRanks];
};
static_assert(sizeof(RankPointers) == 64, "pointer records are 64 bytes");

}  // namespace fusedcomm
