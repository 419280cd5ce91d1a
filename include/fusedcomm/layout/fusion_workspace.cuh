// The fusion workspace (Lamport all-reduce family): what each rank allocates and where.
//
// Per rank, three peer-shared buffers (every rank maps every other rank's copy; their device
// addresses travel in the pointer table, see FusionTable) and one rank-local control block:
//   comm     two-shot: [0, L) staged input, [L, 2L) reduced rows (L = the call's elements)
//   flags    FusionFlags: two-shot meetings and abort marks (PeerSignal), call announcements
//   lamport  three segments of segment_bytes; segment k of a call holds rank p's input at
//            elements [p*L, (p+1)*L); filled with the sentinel at creation (sync/lamport.cuh)
//   control  FusionControl: protocol state of this rank (device memory, not shared)
// FusionLayout computes every size; the host allocator (through workspace_bytes) and the
// kernels use it, so Python never re-types a size.
#pragma once
#include <cstdint>

#include "fusedcomm/layout/peer_signal.cuh"

namespace fusedcomm {

// Largest Lamport segment (bytes), as FlashInfer's MAX_COMM_SIZE: 2^31 - 1 rounded down to 2 MiB.
constexpr int64_t kFusionMaxSegmentBytes = int64_t{2147483647} & ~((int64_t{1} << 21) - 1);

// The flags buffer of one rank (zeroed at creation).
struct FusionFlags {
  PeerSignal meet;                            // cta_meet state + abort_mark (FailureSite)
  alignas(128) uint32_t announce[kMaxRanks];  // announce[p]: rank p's current call word
};

// The call word a rank announces to its peers at the start of each call: the call number
// (24 bits, counted by every rank alike), a 6-bit digest of the call's shape (tokens and row
// bytes: every rank must move the same L) and the algorithm (2 bits). A rank that waits sees
// a peer in the same call with another shape or algorithm and reports a mismatch instead of
// hanging or reading cells laid out for another L.
__host__ __device__ constexpr uint32_t fusion_shape_digest(int64_t token_num, int64_t row_bytes) {
  const uint64_t h = (uint64_t(token_num) * 0x9E3779B97F4A7C15ull) ^ (uint64_t(row_bytes) << 17);
  return uint32_t((h * 0xBF58476D1CE4E5B9ull) >> 58);  // top 6 bits
}
__host__ __device__ constexpr uint32_t fusion_call_word(uint32_t call, uint32_t algorithm,
                                                        uint32_t digest) {
  return (call << 8) | ((digest & 0x3fu) << 2) | (algorithm & 0x3u);
}

// The rank-local control block. The first five int32 are FlashInfer's with our units.
struct FusionControl {
  int32_t arrivals;       // [0] blocks of the running call that have finished
  int32_t calls;          // [1] calls completed (FlashInfer: the two-shot flag value)
  int32_t segment;        // [2] Lamport segment (0..2) of the next one-shot call
  int32_t segment_bytes;  // [3] bytes per Lamport segment
  int32_t clear_packs;    // [4] 16-byte packs the next one-shot call clears in its previous
                          //     segment (FlashInfer: elements)
  int32_t reserved[3];
};
static_assert(sizeof(FusionControl) == 32, "FusionControl is 32 bytes");

// Pointer table entry positions: [comm_0..comm_{W-1}, flags_0.., lamport_0.., control].
struct FusionTable {
  int world;
  __host__ __device__ constexpr int comm(int q) const { return q; }
  __host__ __device__ constexpr int flags(int q) const { return world + q; }
  __host__ __device__ constexpr int lamport(int q) const { return 2 * world + q; }
  __host__ __device__ constexpr int control() const { return 3 * world; }
  __host__ __device__ constexpr int entries() const { return 3 * world + 1; }
};

__host__ __device__ constexpr int64_t round_up_16(int64_t n) { return (n + 15) / 16 * 16; }

// Sizes of one rank's workspace for (world, max_token_num * hidden_dim elements, element size).
struct FusionLayout {
  int world;
  int64_t max_elems;
  int elem_bytes;

  __host__ __device__ constexpr int64_t comm_bytes() const {
    return round_up_16(2 * max_elems * elem_bytes);
  }
  __host__ __device__ constexpr int64_t flags_bytes() const {
    return round_up_16(int64_t{sizeof(FusionFlags)});
  }
  __host__ __device__ constexpr int64_t segment_bytes() const {
    const int64_t full = round_up_16(int64_t{world} * max_elems * elem_bytes);
    return full < kFusionMaxSegmentBytes ? full : kFusionMaxSegmentBytes;
  }
  __host__ __device__ constexpr int64_t lamport_bytes() const { return 3 * segment_bytes(); }

  // Where segment k starts in a rank's Lamport region.
  __host__ __device__ static char* segment_at(void* lamport, int64_t segment_bytes, int k) {
    return static_cast<char*>(lamport) + k * segment_bytes;
  }
};

}  // namespace fusedcomm
