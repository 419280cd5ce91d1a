// The signal header at the start of every rank's meta buffer (the vLLM-compatible layout).
//
//   self_counter[block][peer]            how often this rank's block met `peer`
//   peer_counter[parity][block][peer]    written by `peer`: its count for the meeting
// Two parities let consecutive meetings of one collective alternate slots, so a fast rank's
// next arrival never overwrites a value a slow rank has not read yet. Scratch space for the
// two-shot partial sums follows the header directly.
#pragma once
#include <cstdint>

namespace fusedcomm {

constexpr int kMaxBlocks = 36;
constexpr int kMaxRanks = 8;

struct PeerSignal {
  alignas(128) uint32_t self_counter[kMaxBlocks][kMaxRanks];
  alignas(128) uint32_t peer_counter[2][kMaxBlocks][kMaxRanks];
};
static_assert(sizeof(PeerSignal) == 3456, "the published meta size is 3456 bytes");

__host__ __device__ inline char* scratch_after(PeerSignal* signal) {
  return reinterpret_cast<char*>(signal) + sizeof(PeerSignal);
}

// One pointer record: where each rank's copy of one shared buffer lives in this process.
struct alignas(64) RankPointers {
  const void* ptrs[kMaxRanks];
};
static_assert(sizeof(RankPointers) == 64, "pointer records are 64 bytes");

}  // namespace fusedcomm
