// Decode context-parallel all-to-all: out[e, p, :] = (rank p's input)[e, rank, :] for every
// entry e and rank p, for partial_o rows and stats rows alike. Bytes only, no arithmetic.
//
// Block c serves channel c (layout/dcp_a2a.cuh): the units c, c + G, ... of the call, one per
// round. A channel's rounds are numbered across calls (t = the channel's sequence number in the
// own row, then +1 per round); round t uses buffer parity t & 1. Per round:
//   1. send: wait until every peer q has acked round t - 2 on this parity (ack flags in the own
//      row, [c][b][q]); copy the unit's rows for q into q's buffer [c][b][own rank]; copy the
//      own rank's rows to the output; then store the round's value into q's ready flag
//      [c][b][own rank] (release, system scope).
//   2. receive: wait until every peer's ready flag [c][b][q] in the own row holds the round's
//      value (acquire); copy buffer [c][b][q] to out[e, q, :]; then store the value into q's
//      ack flag [c][b][own rank] (release: the reads are done before q may overwrite).
// Only block c of each rank touches channel c, so the blocks of one rank never wait for each
// other (no grid barrier); block c waits only for block c of other ranks, and each wait targets
// a send of the same round or a receive of an earlier one, so there is no cycle. The double
// buffer lets a fast rank's round t + 1 proceed while a slow peer still reads round t.
//
// Failures (docs/failure-protocol.md): every wait goes through wait_until; a rank that gives up
// writes 1 into its abort mark in every peer's row and its later kernels do nothing.
#pragma once
#include <cstdint>

#include "fusedcomm/common/failure.cuh"
#include "fusedcomm/common/ptx.cuh"
#include "fusedcomm/layout/dcp_a2a.cuh"
#include "fusedcomm/proto/copy_rows.cuh"
#include "fusedcomm/proto/pdl.cuh"
#include "fusedcomm/sync/flag.cuh"
#include "fusedcomm/sync/wait.cuh"

namespace fusedcomm {

constexpr int32_t kOpDcpA2A = 4;

// Failure phases (the describe() export names them in this order).
enum DcpA2APhase : int32_t {
  kDcpPhaseSend = 0,     // waiting for a receiver to free the buffer (its ack of round t - 2)
  kDcpPhaseReceive = 1,  // waiting for a sender's data (its ready flag of round t)
};

// The flag value of round t: never 0 (a fresh row) and never all ones.
__host__ __device__ constexpr uint32_t dcp_flag_value(uint64_t t) {
  return static_cast<uint32_t>(t % (uint64_t{1} << 31)) + 1u;
}

// The W rows of the workspace.
struct DcpA2ARows {
  uint8_t* base;   // row 0
  int64_t stride;  // bytes from one row to the next
  DcpA2ALayout layout;

  __device__ __forceinline__ uint8_t* row(int q) const { return base + q * stride; }
  template <typename T>
  __device__ __forceinline__ T* at(int q, int64_t offset) const {
    return reinterpret_cast<T*>(row(q) + offset);
  }
};

// The failure site of the family (see sync/wait.cuh): abort marks are a word per rank in the
// rows, [p] written only by rank p.
struct DcpA2ASite {
  FailureState failure;
  DcpA2ARows rows;
  uint64_t timeout_ns;
  int32_t op;
  int32_t rank;
  int32_t world;

  __device__ __forceinline__ bool failed() const { return ld_volatile(failure.claim) != 0; }
  __device__ __forceinline__ bool peer_gave_up(int peer) const {
    return ld_relaxed_sys(rows.at<uint32_t>(rank, rows.layout.abort_marks()) + peer) != 0;
  }
  __device__ void mark_peers() const {
    for (int q = 0; q < world; ++q) {
      if (q != rank) st_relaxed_sys(rows.at<uint32_t>(q, rows.layout.abort_marks()) + rank, 1u);
    }
  }
};

struct DcpA2AArgs {
  DcpA2ASite site;
  DcpA2APlan plan;
  const uint8_t* in_o;  // [N, W, o_bytes]
  const uint8_t* in_s;  // [N, W, s_bytes]
  uint8_t* out_o;
  uint8_t* out_s;
  int64_t o_bytes;  // Dv * element size, a multiple of 16
  int64_t s_bytes;  // S * 4, a multiple of 8
};

// Threads [0, W) other than the own rank wait until the flag of peer q (flag_of(q), in the own
// row) holds `want`. Returns the verdict of the whole block.
template <typename FlagOf>
__device__ __forceinline__ bool dcp_wait_peers(const DcpA2ASite& site, int phase, uint32_t want,
                                               const FlagOf& flag_of) {
  bool ok = true;
  const int q = threadIdx.x;
  if (q < site.world && q != site.rank) {
    const uint32_t* f = flag_of(q);
    ok = wait_until(site, q, phase, want, [&](uint32_t& seen) {
      seen = flag_load<MemOrder::kAcquire>(f);
      return seen == want ? Poll::kReady : Poll::kWait;
    });
  }
  return __syncthreads_and(ok);
}

// Threads [0, W) other than the own rank store `value` into flag_of(q) (in peer q's row), after
// everything the block did before (its stores and its loads) is ordered at system scope.
template <typename FlagOf>
__device__ __forceinline__ void dcp_signal_peers(const DcpA2ASite& site, uint32_t value,
                                                 const FlagOf& flag_of) {
  __syncthreads();
  const int q = threadIdx.x;
  if (q < site.world && q != site.rank) {
    __threadfence_system();
    flag_store<MemOrder::kRelease>(flag_of(q), value);
  }
}

// The rows of entries [e0, e0 + m) for rank q: partial_o then stats, from (or to) a tensor
// [N, W, *] into (or out of) a chunk buffer.
template <bool kFromPeer>
__device__ __forceinline__ void dcp_copy_unit(uint8_t* dst_o, int64_t dst_o_stride, uint8_t* dst_s,
                                              int64_t dst_s_stride, const uint8_t* src_o,
                                              int64_t src_o_stride, const uint8_t* src_s,
                                              int64_t src_s_stride, int64_t m,
                                              const DcpA2AArgs& a) {
  // A unit fits a chunk, so its rows hold fewer than 2^31 pieces.
  const int rows = static_cast<int>(m);
  copy_rows<16, kFromPeer>(dst_o, dst_o_stride, src_o, src_o_stride, rows,
                           static_cast<int>(a.o_bytes), threadIdx.x, blockDim.x);
  copy_rows<8, kFromPeer>(dst_s, dst_s_stride, src_s, src_s_stride, rows,
                          static_cast<int>(a.s_bytes), threadIdx.x, blockDim.x);
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads, 4) dcp_a2a_alltoall(DcpA2AArgs a) {
  pdl_wait();
  const DcpA2ASite& site = a.site;
  if (site.failed()) return;  // a failed workspace does nothing, not even its copies
  const DcpA2ARows& rows = site.rows;
  const DcpA2ALayout& l = rows.layout;
  const int c = blockIdx.x, rank = site.rank, world = site.world;
  uint64_t* sequence = rows.at<uint64_t>(rank, l.sequence()) + c;
  const uint64_t first = *sequence;
  const int64_t rounds = a.plan.rounds(c);
  const int64_t o_entry = world * a.o_bytes, s_entry = world * a.s_bytes;  // entry strides
  uint32_t* const ready = rows.at<uint32_t>(rank, l.ready_flags());
  uint32_t* const acks = rows.at<uint32_t>(rank, l.ack_flags());

  for (int64_t k = 0; k < rounds; ++k) {
    const uint64_t t = first + k;
    const int b = static_cast<int>(t & 1);
    const uint32_t value = dcp_flag_value(t);
    const int64_t e0 = (c + k * a.plan.channels) * a.plan.per_unit;
    const int64_t left = a.plan.entries - e0;
    const int64_t m = left < a.plan.per_unit ? left : a.plan.per_unit;

    // 1. Send: every receiver has freed this parity's buffer, then the unit's rows go out.
    const uint32_t freed = t >= 2 ? dcp_flag_value(t - 2) : 0u;
    if (!dcp_wait_peers(site, kDcpPhaseSend, freed,
                        [&](int q) { return acks + l.slot(c, b, q); })) {
      return;
    }
    for (int i = 1; i < world; ++i) {
      const int q = (rank + i) % world;  // ranks start on different peers
      uint8_t* dst = rows.row(q) + l.buffer(c, b, rank);
      const int64_t at = e0 * world + q;
      dcp_copy_unit<false>(dst, a.o_bytes, dst + m * a.o_bytes, a.s_bytes, a.in_o + at * a.o_bytes,
                           o_entry, a.in_s + at * a.s_bytes, s_entry, m, a);
    }
    {
      const int64_t at = e0 * world + rank;
      dcp_copy_unit<false>(a.out_o + at * a.o_bytes, o_entry, a.out_s + at * a.s_bytes, s_entry,
                           a.in_o + at * a.o_bytes, o_entry, a.in_s + at * a.s_bytes, s_entry, m,
                           a);
    }
    dcp_signal_peers(site, value, [&](int q) {
      return rows.at<uint32_t>(q, l.ready_flags()) + l.slot(c, b, rank);
    });

    // 2. Receive: every sender's rows of this round are in the own row's buffers.
    if (!dcp_wait_peers(site, kDcpPhaseReceive, value,
                        [&](int q) { return ready + l.slot(c, b, q); })) {
      return;
    }
    for (int i = 1; i < world; ++i) {
      const int q = (rank + world - i) % world;
      const uint8_t* src = rows.row(rank) + l.buffer(c, b, q);
      const int64_t at = e0 * world + q;
      dcp_copy_unit<true>(a.out_o + at * a.o_bytes, o_entry, a.out_s + at * a.s_bytes, s_entry, src,
                          a.o_bytes, src + m * a.o_bytes, a.s_bytes, m, a);
    }
    dcp_signal_peers(site, value, [&](int q) {
      return rows.at<uint32_t>(q, l.ack_flags()) + l.slot(c, b, rank);
    });
  }
  if (threadIdx.x == 0) *sequence = first + static_cast<uint64_t>(rounds);
  pdl_trigger();
}

}  // namespace fusedcomm
