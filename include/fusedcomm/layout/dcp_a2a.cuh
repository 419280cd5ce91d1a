// The decode context-parallel all-to-all workspace (docs/dcp-a2a.md): one row of bytes per rank,
// mapped by every peer at one stride. W = cp_size, C = kChannels, A(x) = x rounded up to 128:
//   sequence numbers   uint64 [C]          0                  (own: chunks done per channel)
//   abort marks        uint32 [W]          C * 8              ([p]: rank p gave up)
//   ready flags        uint32 [C][2][W]    A(C * 8 + 4W)      ([c][b][p]: written by sender p)
//   ack flags          uint32 [C][2][W]    A(ready + 8CW)     ([c][b][q]: written by receiver q)
//   chunk buffers      [C][2][W] chunks    A(ack + 8CW)       ([c][b][p]: from sender p)
// A chunk buffer holds kChunkBytes: the `m` partial_o rows of a unit back to back, then its `m`
// stats rows. Everything depends on W alone, so every rank sizes the same row.
//
// DcpA2APlan splits a call's N entries (the flattened leading index) into units of `per_unit`
// consecutive entries; unit u goes to channel u % channels, in round u / channels of that
// channel. The plan depends only on N, the row sizes and cp_size, which every rank shares.
//
// python/fusedcomm/runtime/dcp_a2a_workspace.py mirrors both structs; its test compiles this
// header and compares every number.
#pragma once
#include <cstdint>

namespace fusedcomm {

struct DcpA2ALayout {
  static constexpr int kChannels = 32;           // C: thread blocks one call uses at most
  static constexpr int64_t kChunkBytes = 16384;  // one unit of one (sender, receiver) pair
  static constexpr int64_t kAlign = 128;         // A(x)
  static constexpr int kMaxCpSize = 64;          // ranks of one CP group

  int32_t cp_size;  // W

  __host__ __device__ static constexpr int64_t align(int64_t n) {
    return (n + kAlign - 1) / kAlign * kAlign;
  }
  __host__ __device__ constexpr int64_t flag_bytes() const {
    return int64_t{4} * 2 * kChannels * cp_size;
  }

  __host__ __device__ constexpr int64_t sequence() const { return 0; }
  __host__ __device__ constexpr int64_t abort_marks() const { return 8 * kChannels; }
  __host__ __device__ constexpr int64_t ready_flags() const {
    return align(abort_marks() + 4 * int64_t{cp_size});
  }
  __host__ __device__ constexpr int64_t ack_flags() const {
    return align(ready_flags() + flag_bytes());
  }
  __host__ __device__ constexpr int64_t buffers() const {
    return align(ack_flags() + flag_bytes());
  }
  __host__ __device__ constexpr int64_t size_per_rank() const {
    return buffers() + int64_t{2} * kChannels * cp_size * kChunkBytes;
  }

  // Index of flag / buffer [channel][parity][rank] among the C * 2 * W of its kind.
  __host__ __device__ constexpr int64_t slot(int channel, int parity, int rank) const {
    return (int64_t{channel} * 2 + parity) * cp_size + rank;
  }
  __host__ __device__ constexpr int64_t buffer(int channel, int parity, int rank) const {
    return buffers() + slot(channel, parity, rank) * kChunkBytes;
  }
};

struct DcpA2APlan {
  int64_t entries;      // N
  int64_t entry_bytes;  // one partial_o row plus one stats row
  int64_t per_unit;     // entries of one unit (>= 1; 0 when N == 0 or a row does not fit)
  int64_t units;
  int32_t channels;  // thread blocks of the call

  // Thread blocks a call of a CP group of `cp` ranks uses at most: kChannels, fewer for large
  // groups, so that the kernels of every rank fit one GPU at once when ranks share it (4 blocks
  // of 256 threads per SM hold 128 of them on any GPU of 32 SMs or more).
  __host__ __device__ static constexpr int max_channels(int cp) {
    const int share = cp > 0 ? 128 / cp : DcpA2ALayout::kChannels;
    return share < 4 ? 4 : (share > DcpA2ALayout::kChannels ? DcpA2ALayout::kChannels : share);
  }

  // Units as small as spreads N over the channels, as large as a chunk holds.
  __host__ __device__ static constexpr DcpA2APlan make(int64_t n, int64_t o_bytes, int64_t s_bytes,
                                                       int cp) {
    const int64_t entry = o_bytes + s_bytes;
    const int64_t fit = entry > 0 ? DcpA2ALayout::kChunkBytes / entry : 0;
    const int64_t most = max_channels(cp);
    const int64_t spread = (n + most - 1) / most;
    const int64_t per = n <= 0 || fit < 1 ? 0 : (spread < fit ? (spread < 1 ? 1 : spread) : fit);
    const int64_t units = per > 0 ? (n + per - 1) / per : 0;
    const int64_t ch = units < most ? units : most;
    return DcpA2APlan{n, entry, per, units, static_cast<int32_t>(ch)};
  }

  // Rounds of channel c in this call.
  __host__ __device__ constexpr int64_t rounds(int c) const {
    return c < units ? (units - c + channels - 1) / channels : 0;
  }
};

}  // namespace fusedcomm
