// Mixed communication on unicast peer memory (§12): AR / AG / AR+AG ("gather" kinds) and RS /
// RS+AR ("scatter" kinds) over the W = tp * dp ranks of one node, rank = t + d * tp.
//
// A call's P packs (16 bytes: of x_in for the gather kinds, of one DP block of it for the
// scatter kinds) split into items (layout/mixed_comm.cuh: MixedCommPlan); block b runs items
// b, b + blocks, ... as rounds. Round r of a block uses its slot buffer k = r % 3 in every row:
// it first puts the sentinel back into buffer (r - 1) % 3 of its own row (what its previous
// round read), then writes its data into the peers' buffer k with lamport_push, and reads its
// own buffer k with lamport_pull (the data marks its own arrival: no flag, no meeting).
//
//   one round (OPT_WAITS)  gather:  push the item to every rank; block d' of the output =
//                                   sum over t' of sender (t', d')'s item.
//                          scatter: push block dq's item to every rank (tq, dq); output =
//                                   sum over every sender of its item.
//   two rounds (OPT_BYTES1) the item splits into tp pieces, piece j owned by TP rank j.
//                          gather:  phase 0 pushes piece j to (j, d); the owner sums its piece
//                                   over t' and pushes the sum to every rank (phase 1), which
//                                   places it in block d'.
//                          scatter: phase 0 pushes block dq's piece tq to (tq, dq); the owner
//                                   sums over every sender and pushes the sum to its TP group.
// Sums are fp32 in rank order (TP order, or rank order over all W), rounded once; a value is
// reduced by one rank (two rounds) or by every rank in the same order (one round), so the TP
// ranks of a group get the same bits. Inputs (and two-round sums) travel with -0.0 as +0.0
// (the sentinel).
//
// Why the buffer rotation is safe: a peer writes my buffer k in round r only after finishing
// round r - 1, which needed data I pushed in round r - 1 (every round has a phase in which
// every rank pushes at least one pack to every rank), after I had cleared buffer k (in round
// r - 2) and fenced. So no write of round r lands before the clear, and no clear lands on
// data of round r.
//
// Failures (docs/failure-protocol.md): every pull is bounded by wait_until; a rank that gives up
// marks every peer's abort word and its later kernels do nothing.
#pragma once
#include <cstdint>

#include "fusedcomm/common/failure.cuh"
#include "fusedcomm/common/ptx.cuh"
#include "fusedcomm/common/vec.cuh"
#include "fusedcomm/layout/mixed_comm.cuh"
#include "fusedcomm/proto/lamport.cuh"
#include "fusedcomm/sync/wait.cuh"

namespace fusedcomm {

constexpr int32_t kOpMixedComm = 5;

// Failure phases (the describe() export names them in this order).
enum MixedCommPhase : int32_t {
  kMixedPhaseData = 0,    // waiting for a sender's item (or piece) of the round
  kMixedPhaseShared = 1,  // waiting for an owner's reduced piece (two rounds)
};

// The W rows: row q is rank q's memory, mapped here at one stride.
struct MixedCommRows {
  uint8_t* base;
  int64_t stride;
  MixedCommLayout layout;

  __device__ __forceinline__ uint8_t* row(int q) const { return base + q * stride; }
  __device__ __forceinline__ uint4* slot(int q, int k, int b, int phase, int sender) const {
    return reinterpret_cast<uint4*>(row(q) + layout.slot(k, b, phase, sender));
  }
};

// The failure site (sync/wait.cuh): abort marks are a word per rank in the rows, [p] written
// only by rank p.
struct MixedCommSite {
  FailureState failure;
  MixedCommRows rows;
  uint64_t timeout_ns;
  int32_t op;
  int32_t rank;
  int32_t world;

  __device__ __forceinline__ uint32_t* marks(int q) const {
    return reinterpret_cast<uint32_t*>(rows.row(q) + rows.layout.abort_marks());
  }
  __device__ __forceinline__ bool failed() const { return ld_volatile(failure.claim) != 0; }
  __device__ __forceinline__ bool peer_gave_up(int peer) const {
    return ld_relaxed_sys(marks(rank) + peer) != 0;
  }
  __device__ void mark_peers() const {
    for (int q = 0; q < world; ++q) {
      if (q != rank) st_relaxed_sys(marks(q) + rank, 1u);
    }
  }
};

struct MixedCommArgs {
  MixedCommSite site;
  MixedCommPlan plan;
  const uint4* in;  // x_in, packs
  uint4* out;       // x_out, packs
  int32_t tp;
  int32_t dp;
};

// The piece of TP owner j in the item [lo, lo + n): [lo + j n / tp, lo + (j + 1) n / tp).
__device__ __forceinline__ int64_t mixed_piece(int64_t lo, int64_t n, int j, int tp) {
  return lo + j * n / tp;
}

template <typename T>
__device__ __forceinline__ bool mixed_pull(const MixedCommSite& site, int sender, int phase,
                                           const uint4* cells, int64_t i, Pack<T>& v) {
  return lamport_pull<T>(site, sender, phase, cells, i, v);
}

template <typename T, bool kScatter, bool kTwoRounds, int kThreads>
__global__ void __launch_bounds__(kThreads) mixed_comm_kernel(MixedCommArgs a) {
  const MixedCommSite& site = a.site;
  if (site.failed()) return;  // a failed communicator does nothing
  const MixedCommRows& rows = site.rows;
  const int b = blockIdx.x, me = site.rank, world = site.world, tp = a.tp, dp = a.dp;
  const int t = me % tp, d = me / tp;
  const int tid = threadIdx.x;
  MixedBlockState* state =
      reinterpret_cast<MixedBlockState*>(rows.row(me) + rows.layout.block_state()) + b;
  int k = static_cast<int>(state->buffer % 3);
  uint32_t used[3][2];
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    used[i][0] = state->used[i][0];
    used[i][1] = state->used[i][1];
  }
  const int64_t P = a.plan.packs;
  bool ok = true;

  for (int64_t item = b; item < a.plan.items; item += a.plan.blocks) {
    const int64_t lo = a.plan.begin(item), n = a.plan.begin(item + 1) - lo;
    const int64_t piece_max = kTwoRounds ? (n + tp - 1) / tp : n;

    // 0. The sentinel back into what the previous round read.
    const int prev = (k + 2) % 3;
    for (int ph = 0; ph < 2; ++ph) {
      for (int s = 0; s < world; ++s) {
        uint4* cells = rows.slot(me, prev, b, ph, s);
        for (int64_t i = tid; i < used[prev][ph]; i += kThreads) lamport_clear<T>(cells, i);
      }
    }
    __threadfence();
    __syncthreads();

    // 1. Phase 0: every sender's data into its receivers' slots.
    for (int q = 0; q < world; ++q) {
      const int tq = q % tp, dq = q / tp;
      if (kTwoRounds && !kScatter && dq != d) continue;  // gather pieces stay in the TP group
      int64_t src = lo, len = n;
      if (kTwoRounds) {
        src = mixed_piece(lo, n, tq, tp);
        len = mixed_piece(lo, n, tq + 1, tp) - src;
      }
      if (kScatter) src += dq * P;
      uint4* cells = rows.slot(q, k, b, 0, me);
      for (int64_t i = tid; i < len; i += kThreads) {
        lamport_push<T>(cells, i, Pack<T>{a.in[src + i]});
      }
    }

    // 2. Phase 0 receive: sum what arrived.
    const int64_t mine = kTwoRounds ? mixed_piece(lo, n, t, tp) : lo;
    const int64_t mine_len = kTwoRounds ? mixed_piece(lo, n, t + 1, tp) - mine : n;
    const int blocks_out = kScatter || kTwoRounds ? 1 : dp;  // one-round gather: every block
    for (int64_t i = tid; ok && i < mine_len; i += kThreads) {
      for (int dd = 0; ok && dd < blocks_out; ++dd) {
        // Senders of this sum: the TP group of block dd (gather), or every rank (scatter).
        const int first = kScatter ? 0 : (kTwoRounds ? d : dd) * tp;
        const int count = kScatter ? world : tp;
        float acc[Pack<T>::kElems];
        Pack<T> v;
        ok = mixed_pull<T>(site, first, kMixedPhaseData, rows.slot(me, k, b, 0, first), i, v);
        unpack_to(v, acc);
        for (int s = first + 1; ok && s < first + count; ++s) {
          ok = mixed_pull<T>(site, s, kMixedPhaseData, rows.slot(me, k, b, 0, s), i, v);
          accumulate(acc, v);
        }
        if (!ok) break;
        const Pack<T> sum = pack_from<T>(acc);
        if (!kTwoRounds) {
          const int64_t at = kScatter ? lo + i : dd * P + lo + i;
          store_pack(a.out, at, sum);
        } else {
          // The owner's sum goes to every rank (gather) or to its TP group (scatter).
          for (int q = 0; q < world; ++q) {
            if (kScatter && q / tp != d) continue;
            lamport_push<T>(rows.slot(q, k, b, 1, me), i, sum);
          }
        }
      }
    }
    if (!__syncthreads_and(ok)) return;

    // 3. Phase 1 (two rounds): every owner's reduced piece into place.
    if (kTwoRounds) {
      for (int s = 0; s < world; ++s) {
        const int ts = s % tp, ds = s / tp;
        if (kScatter && ds != d) continue;
        const int64_t at = mixed_piece(lo, n, ts, tp) + (kScatter ? 0 : ds * P);
        const int64_t len = mixed_piece(lo, n, ts + 1, tp) - mixed_piece(lo, n, ts, tp);
        const uint4* cells = rows.slot(me, k, b, 1, s);
        for (int64_t i = tid; ok && i < len; i += kThreads) {
          Pack<T> v;
          ok = mixed_pull<T>(site, s, kMixedPhaseShared, cells, i, v);
          if (ok) store_pack(a.out, at + i, v);
        }
      }
      if (!__syncthreads_and(ok)) return;
    }

    used[k][0] = static_cast<uint32_t>(piece_max);
    used[k][1] = kTwoRounds ? static_cast<uint32_t>(piece_max) : 0u;
    k = (k + 1) % 3;
  }
  if (tid == 0) {
    state->buffer = static_cast<uint32_t>(k);
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      state->used[i][0] = used[i][0];
      state->used[i][1] = used[i][1];
    }
  }
}

}  // namespace fusedcomm
