// The MoE all-to-all workspace (docs/moe-a2a.md): one row of bytes per rank, mapped by every peer.
//
// A row starts with the auxiliary fields, then the payload data (A(x) = x rounded up to 128):
//   flag value                 uint32            0
//   local token counter        int32             4
//   send counters              int32 [W]         8                  (per destination)
//   recv counters              int32 [W]         8 + 4W             (per source)
//   dispatch completion flags  uint32 [W]        A(8 + 8W)          (per source)
//   combine completion flags   uint32 [W]        A(previous + 4W)   (per source)
//   top-k target ranks         int32 [M, 22]     A(previous + 4W)
//   top-k send indices         int32 [M, 22]     A(previous + 88M)
//   EPLB gathered stats        int32 [W, n]      A(previous + 88M)  (n = 0: empty)
//   payload data               rest              A(previous + 4Wn)
// (W = ep_size, M = max_num_tokens, n = eplb_stats_num_experts.) The top-k tables always have
// kMaxTopK columns whatever the call's top_k.
//
// Two more things live in the 128-byte padding after the completion flags, which is why the
// kernels serve at most kMaxKernelRanks ranks (4W <= 64 leaves the second half of each padded
// line free):
//   combine arrivals           int32             dispatch flags + 64   (blocks of a combine)
//   combine claims             int32             dispatch flags + 68   (push chunks taken)
//   combine chunks done        int32             dispatch flags + 72   (push chunks copied)
//   release flags              uint32 [W]        combine flags + 64    (per source)
// Rank q stores into release flag [q] of every row when it has finished reading the rows of a
// round (the end of its combine); a dispatch writes into no row before every rank has done so
// for the previous round, so a round whose regions overlap the last one's (a larger R moves
// the combine region) never overwrites data a peer still reads. The local token counter
// counts the blocks of a dispatch that are done.
//
// During one round (R = runtime_max_tokens_per_rank <= M) the payload data holds the dispatch
// payloads back to back, payload i as [W, R, bytes_i] (slot (src, j) of payload i at
// base_i + (src * R + j) * bytes_i), then, from A(end of the dispatch payloads), the combine
// region [W, R, combine bytes]. MoeA2ALayout gives the row's offsets and size, MoeA2ARound the
// payload offsets of one round; the host (allocation, metainfo, checks) and the kernels use
// the same objects, and python/fusedcomm/runtime/moe_a2a_workspace.py mirrors them (its test
// compiles this header and compares every number).
#pragma once
#include <cstdint>

namespace fusedcomm {

struct MoeA2ALayout {
  static constexpr int kMaxTopK = 22;         // columns of the top-k tables
  static constexpr int kMaxEpSize = 64;       // ranks of one EP group
  static constexpr int kMaxPayloads = 6;      // dispatch payloads of one round
  static constexpr int64_t kAlign = 128;      // A(x)
  static constexpr int kMetainfoFields = 9;   // metainfo entries without the EPLB region
  static constexpr int kMaxKernelRanks = 16;  // ranks the kernels serve (see the padding above)

  int32_t ep_size;                 // W
  int64_t max_num_tokens;          // M
  int32_t eplb_stats_num_experts;  // n (0: no EPLB region)

  __host__ __device__ static constexpr int64_t align(int64_t n) {
    return (n + kAlign - 1) / kAlign * kAlign;
  }

  __host__ __device__ constexpr int64_t flag_value() const { return 0; }
  __host__ __device__ constexpr int64_t local_token_counter() const { return 4; }
  __host__ __device__ constexpr int64_t send_counters() const { return 8; }
  __host__ __device__ constexpr int64_t recv_counters() const { return 8 + 4 * int64_t{ep_size}; }
  __host__ __device__ constexpr int64_t dispatch_completion_flags() const {
    return align(recv_counters() + 4 * int64_t{ep_size});
  }
  __host__ __device__ constexpr int64_t combine_completion_flags() const {
    return align(dispatch_completion_flags() + 4 * int64_t{ep_size});
  }
  __host__ __device__ constexpr int64_t combine_arrivals() const {
    return dispatch_completion_flags() + 4 * kMaxKernelRanks;
  }
  __host__ __device__ constexpr int64_t combine_claims() const { return combine_arrivals() + 4; }
  __host__ __device__ constexpr int64_t combine_done() const { return combine_arrivals() + 8; }
  __host__ __device__ constexpr int64_t release_flags() const {
    return combine_completion_flags() + 4 * kMaxKernelRanks;
  }
  __host__ __device__ constexpr int64_t topk_table_bytes() const {
    return 4 * kMaxTopK * max_num_tokens;
  }
  __host__ __device__ constexpr int64_t topk_target_ranks() const {
    return align(combine_completion_flags() + 4 * int64_t{ep_size});
  }
  __host__ __device__ constexpr int64_t topk_send_indices() const {
    return align(topk_target_ranks() + topk_table_bytes());
  }
  __host__ __device__ constexpr int64_t eplb_gathered_stats() const {
    return align(topk_send_indices() + topk_table_bytes());
  }
  __host__ __device__ constexpr int64_t eplb_stats_bytes() const {
    return 4 * int64_t{ep_size} * eplb_stats_num_experts;
  }
  // PAYLOAD_DATA_OFFSET: the auxiliary fields' size, 128-aligned.
  __host__ __device__ constexpr int64_t payload_data() const {
    return align(eplb_gathered_stats() + eplb_stats_bytes());
  }

  // Number of metainfo entries: 9, or 10 with an EPLB region.
  __host__ __device__ constexpr int metainfo_fields() const {
    return eplb_stats_num_experts > 0 ? kMetainfoFields + 1 : kMetainfoFields;
  }
  // Metainfo entry `field`, in the reference API's order (the EPLB entry only with an EPLB
  // region).
  __host__ __device__ constexpr int64_t metainfo(int field) const {
    switch (field) {
      case 0: return flag_value();
      case 1: return local_token_counter();
      case 2: return send_counters();
      case 3: return recv_counters();
      case 4: return dispatch_completion_flags();
      case 5: return combine_completion_flags();
      case 6: return topk_target_ranks();
      case 7: return topk_send_indices();
      case 8: return eplb_stats_num_experts > 0 ? eplb_gathered_stats() : payload_data();
      default: return payload_data();
    }
  }

  // Bytes one rank allocates for the largest round: M tokens from each of W ranks with
  // `dispatch_bytes` (all dispatch payloads together) and `combine_bytes` per token.
  __host__ __device__ constexpr int64_t size_per_rank(int64_t dispatch_bytes,
                                                      int64_t combine_bytes) const {
    const int64_t slots = int64_t{ep_size} * max_num_tokens;
    return payload_data() + align(slots * dispatch_bytes) + align(slots * combine_bytes);
  }
};

// The payload data of one round: dispatch payload i of payload_bytes[i] bytes per token.
struct MoeA2ARound {
  MoeA2ALayout row;
  int64_t max_tokens;  // R = runtime_max_tokens_per_rank
  int32_t num_payloads;
  int64_t payload_bytes[MoeA2ALayout::kMaxPayloads];

  __host__ __device__ constexpr int64_t slots() const { return int64_t{row.ep_size} * max_tokens; }
  // Where dispatch payload i starts in the row (payloads 0 .. i-1 lie before it, unpadded).
  __host__ __device__ constexpr int64_t dispatch_payload(int i) const {
    int64_t offset = row.payload_data();
    for (int p = 0; p < i; ++p) offset += slots() * payload_bytes[p];
    return offset;
  }
  __host__ __device__ constexpr int64_t dispatch_end() const {
    return dispatch_payload(num_payloads);
  }
  // combine_payload_offset: where the combine region [W, R, combine bytes] starts in the row.
  __host__ __device__ constexpr int64_t combine_region() const {
    return MoeA2ALayout::align(dispatch_end());
  }
  __host__ __device__ constexpr int64_t combine_end(int64_t combine_bytes) const {
    return combine_region() + slots() * combine_bytes;
  }
};

}  // namespace fusedcomm
