// Arguments of the MoE all-to-all kernels (dispatch, combine, sanitize) and what they share:
// the rows of the workspace and the failure site that keeps its abort marks in those rows.
//
// The workspace is W rows of bytes at one stride (layout/moe_a2a.cuh); row q is rank q's
// memory, mapped here. Each row's flags are per source: flag [p] of row q is written only by
// rank p. A rank that gives up writes kA2AAborted into its dispatch, combine and release flags
// of every peer's row; it writes nothing afterwards (its kernels check the claim at entry), so
// the mark stays until the workspace is initialised again.
//
// Flag values (kernels/moe_a2a_flags.cuh): every dispatch and combine takes the next value of
// its rank's own counter, 1 .. kMaxFlagValue then 1 again; a combine that pushes sets kPushBit
// in its combine flags, one on the low-precision wire kLowBit (kernels/moe_a2a_combine.cuh).
// The abort mark is no value of any kind.
#pragma once
#include <cstdint>

#include "fusedcomm/common/failure.cuh"
#include "fusedcomm/common/ptx.cuh"
#include "fusedcomm/kernels/moe_a2a_flags.cuh"
#include "fusedcomm/layout/moe_a2a.cuh"

namespace fusedcomm {

constexpr int32_t kOpMoeA2A = 3;

// Failure phases (the describe() export names them in this order).
enum MoeA2APhase : int32_t {
  kPhaseRelease = 0,   // dispatch: every rank has finished reading the previous round
  kPhaseDispatch = 1,  // dispatch: every source has sent its tokens
  kPhaseCombine = 2,   // combine: every rank's combine payload is ready
};

// The W rows of the workspace.
struct MoeA2ARows {
  uint8_t* base;   // row 0
  int64_t stride;  // bytes from one row to the next
  MoeA2ALayout layout;

  __device__ __forceinline__ uint8_t* row(int q) const { return base + q * stride; }
  template <typename W>
  __device__ __forceinline__ W* at(int q, int64_t offset) const {
    return reinterpret_cast<W*>(row(q) + offset);
  }
  // Flag [src] of row q in the flag array at `offset`.
  __device__ __forceinline__ uint32_t* flag(int q, int64_t offset, int src) const {
    return at<uint32_t>(q, offset) + src;
  }
};

// The failure site of the family (see sync/wait.cuh): abort marks are flag values in the rows.
// `active`: the ranks of this round (active_rank_mask; every rank by default). The others are
// neither sent to nor waited for, and nothing they wrote into the own row is read; the failure
// marks still go to every rank.
struct MoeA2ASite {
  FailureState failure;
  MoeA2ARows rows;
  uint64_t timeout_ns;
  int32_t op;
  int32_t rank;
  int32_t world;
  uint32_t active;

  __device__ __forceinline__ bool failed() const { return ld_volatile(failure.claim) != 0; }
  __host__ __device__ __forceinline__ bool is_active(int q) const { return (active >> q) & 1u; }
  __device__ __forceinline__ bool peer_gave_up(int peer) const {
    const MoeA2ALayout& l = rows.layout;
    return ld_relaxed_sys(rows.flag(rank, l.dispatch_completion_flags(), peer)) == kA2AAborted ||
           ld_relaxed_sys(rows.flag(rank, l.combine_completion_flags(), peer)) == kA2AAborted ||
           ld_relaxed_sys(rows.flag(rank, l.release_flags(), peer)) == kA2AAborted;
  }
  __device__ void mark_peers() const {
    const MoeA2ALayout& l = rows.layout;
    for (int q = 0; q < world; ++q) {
      if (q == rank) continue;
      st_relaxed_sys(rows.flag(q, l.dispatch_completion_flags(), rank), kA2AAborted);
      st_relaxed_sys(rows.flag(q, l.combine_completion_flags(), rank), kA2AAborted);
      st_relaxed_sys(rows.flag(q, l.release_flags(), rank), kA2AAborted);
    }
  }
};

struct MoeDispatchArgs {
  MoeA2ASite site;
  const int32_t* experts;       // [local_tokens, top_k]
  unsigned long long* dropped;  // count of (token, k) pairs with an id outside [0, E), 64 bits
  int32_t local_tokens;
  int32_t top_k;
  int32_t num_experts;
  int32_t num_payloads;
  int32_t eplb_count;         // entries of eplb_stats (0: no EPLB statistics this round)
  const int32_t* eplb_stats;  // [eplb_count]: written to [rank, :eplb_count] of every row
  int64_t max_tokens;         // R
  // Payload i: rows of `bytes` bytes at `src` + t * src_stride, sent to `dst` (an offset in
  // the destination's row) + (rank * R + slot) * bytes, `width` bytes at a time.
  const uint8_t* src[MoeA2ALayout::kMaxPayloads];
  int64_t src_stride[MoeA2ALayout::kMaxPayloads];
  int64_t bytes[MoeA2ALayout::kMaxPayloads];
  int64_t dst[MoeA2ALayout::kMaxPayloads];
  int32_t width[MoeA2ALayout::kMaxPayloads];
};

struct MoeCombineArgs {
  MoeA2ASite site;
  const uint8_t* payload;  // [W, R, H] contiguous; nullptr: already in the combine region
  uint8_t* out;            // [local_tokens, H]
  int32_t local_tokens;
  int32_t top_k;
  int64_t max_tokens;  // R
  int64_t row_bytes;   // H * element size, a multiple of 16
  int64_t region;      // combine_payload_offset: the combine region in every row
};

struct MoeSanitizeArgs {
  const int32_t* recv_counts;  // [W], own row
  int32_t* ids;                // [W, R, top_k] at the strides below (elements)
  int64_t stride_src;
  int64_t stride_slot;
  int64_t stride_k;
  int32_t world;
  int32_t top_k;
  int64_t max_tokens;
  int32_t invalid_id;
};

}  // namespace fusedcomm
