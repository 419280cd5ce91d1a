// Routing one token of a MoE all-to-all dispatch: which ranks get it, and in which slot.
//
// expert_owner: the rank that owns expert e of E on W ranks, contiguous ceil/floor split
// (ranks below E mod W own one expert more); -1 for an id outside [0, E).
//
// route_token: one warp routes one token; lane k < top_k handles the token's k-th expert. The
// first k that targets a rank takes the next slot of that rank (an atomic increment of
// `counters[rank]`, global or shared memory); later k with the same rank, and ids outside
// [0, E), get (-1, -1); so do experts of ranks outside `active` (a mask over ranks: the ranks
// of this round), which are not counted as dropped.
// Returns the lane's (rank, slot); `dests` (a lane mask over ranks) says which ranks get the
// token, the same on every lane.
#pragma once
#include <cstdint>

namespace fusedcomm {

__device__ __forceinline__ int expert_owner(int e, int num_experts, int world) {
  if (e < 0 || e >= num_experts) return -1;
  const int base = num_experts / world, rem = num_experts % world;
  const int split = rem * (base + 1);
  return e < split ? e / (base + 1) : rem + (e - split) / base;
}

struct Route {
  int rank;  // -1: this k sends nothing
  int slot;
};

// Call with the whole warp. `counters`: one per rank. `dropped` (64 bits: it never wraps in
// the life of a process) counts the lane's id when it lies outside [0, E).
__device__ __forceinline__ Route route_token(const int32_t* experts, int top_k, int num_experts,
                                             int world, int32_t* counters,
                                             unsigned long long* dropped, uint32_t& dests,
                                             uint32_t active_ranks = ~0u) {
  const int k = threadIdx.x & 31;
  const bool active = k < top_k;
  int owner = active ? expert_owner(experts[k], num_experts, world) : -1;
  if (active && owner < 0) atomicAdd(dropped, 1ull);
  if (owner >= 0 && !((active_ranks >> owner) & 1u)) owner = -1;
  // Lanes with the same owner; the lowest of them sends.
  const uint32_t same = __match_any_sync(0xffffffffu, owner);
  const bool first = owner >= 0 && (__ffs(same) - 1) == k;
  Route r{-1, -1};
  if (first) r = Route{owner, atomicAdd(&counters[owner], 1)};
  const uint32_t senders = __ballot_sync(0xffffffffu, first);
  // Ranks that get the token: gather the senders' owners into one mask.
  uint32_t mask = first ? (1u << owner) : 0u;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mask |= __shfl_xor_sync(0xffffffffu, mask, off);
  dests = senders != 0 ? mask : 0u;
  return r;
}

}  // namespace fusedcomm
