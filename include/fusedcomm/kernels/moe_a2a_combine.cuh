// MoE all-to-all combine: the experts' results go back to the tokens' ranks, which sum them.
//
// Push (the payload is a tensor of the caller): rank r copies its rows [src, j], j <
// recv_count[src], into row [r, j] of src's combine region (per source one contiguous run,
// copied by the whole grid; its own rows stay where they are); every rank then reads the terms
// of its tokens from its own row and its own payload.
// Pull (the payload already lies in the own combine region, rows [src, j]): nothing is copied;
// every rank reads the terms of its tokens from the owners' rows. Either way the term (q, j)
// of a token is the same row, so both give the same bits.
//
//   1. Push: copy. The last block to finish it (pull: block 0) stores the round's flag value
//      into every rank's combine flags [own rank] (release, system scope), with kPushBit when
//      it pushed: all ranks of a round must use one mode (a rank in the other is reported as a
//      mismatch). Every block waits until all sources' flags in the own row hold it (acquire).
//      The grid must be co-resident: the host sizes it from the occupancy.
//   2. Per local token (one block each, grid-stride): out[t] = the fixed-order fp32 sum
//      (proto/combine_sum.cuh) over k of term(target_ranks[t, k], send_indices[t, k]), +0 for a
//      k that sent nothing; one final rounding.
//   3. The last block to finish reading stores the value into every rank's release flags
//      [own rank], so the next dispatch may overwrite the rows.
// The push writes only combine regions, which no rank reads before this round's flags: the
// dispatch's release wait already ordered this round after every rank's reads of the last.
// kTopK: the compile-time top_k of a pairwise tree; 0: any top_k, summed sequentially.
#pragma once
#include "fusedcomm/common/vec.cuh"
#include "fusedcomm/kernels/moe_a2a_args.cuh"
#include "fusedcomm/kernels/moe_a2a_dispatch.cuh"
#include "fusedcomm/proto/combine_sum.cuh"

namespace fusedcomm {

// The terms of one token: the address of each k's row (push: in the own combine region at
// [owner, slot], or in the own payload when the owner is this rank; pull: in the owner's
// combine region at [own rank, slot]), nullptr for a k that sent nothing.
// Threads read them from shared memory.
__device__ __forceinline__ void combine_sources(const MoeCombineArgs& a, int t,
                                                const uint8_t** s_src) {
  const MoeA2ARows& rows = a.site.rows;
  const MoeA2ALayout& l = rows.layout;
  const int k = threadIdx.x;
  if (k < a.top_k) {
    const int64_t at = int64_t{t} * MoeA2ALayout::kMaxTopK + k;
    const int q = rows.at<int32_t>(a.site.rank, l.topk_target_ranks())[at];
    const int j = rows.at<int32_t>(a.site.rank, l.topk_send_indices())[at];
    const int r = a.site.rank;
    const uint8_t* term = nullptr;
    if (q < 0 || j < 0) {
      term = nullptr;
    } else if (a.payload == nullptr) {
      term = rows.row(q) + a.region + (r * a.max_tokens + j) * a.row_bytes;
    } else if (q == r) {
      term = a.payload + (r * a.max_tokens + j) * a.row_bytes;
    } else {
      term = rows.row(r) + a.region + (q * a.max_tokens + j) * a.row_bytes;
    }
    s_src[k] = term;
  }
}

template <typename T>
__device__ __forceinline__ void load_term(float (&x)[Pack<T>::kElems], const uint8_t* src,
                                          int64_t i) {
  if (src != nullptr) {
    unpack_to(load_pack<T>(src, i), x);
  } else {
#pragma unroll
    for (int e = 0; e < Pack<T>::kElems; ++e) x[e] = 0.0f;
  }
}

// kPacks packs of one token (packs i, i + stride, ...), pairwise tree of kTopK terms: every
// term of every pack is loaded before the first sum, so kPacks * (sending ranks) loads are in
// flight per thread.
template <typename T, int kTopK, int kPacks>
__device__ __forceinline__ void combine_packs(const uint8_t* const* src, uint8_t* out, int64_t i,
                                              int64_t stride, int64_t packs) {
  constexpr int kE = Pack<T>::kElems;
  Pack<T> raw[kPacks][kTopK];
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int64_t at = i + p * stride;
#pragma unroll
    for (int k = 0; k < kTopK; ++k) {
      raw[p][k].raw = make_uint4(0, 0, 0, 0);
      if (src[k] != nullptr && at < packs) raw[p][k] = load_pack<T>(src[k], at);
    }
  }
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int64_t at = i + p * stride;
    if (at >= packs) break;
    float x[kTopK][kE];
#pragma unroll
    for (int k = 0; k < kTopK; ++k) unpack_to(raw[p][k], x[k]);
    float sum[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      float acc[kTopK];
#pragma unroll
      for (int k = 0; k < kTopK; ++k) acc[k] = x[k][e];
      sum[e] = combine_sum<kTopK>(acc);
    }
    store_pack<T>(out, at, pack_from<T>(sum));
  }
}

// One pack of one token, any top_k, sequential sum (four terms loaded at a time).
template <typename T>
__device__ __forceinline__ Pack<T> combine_pack_sequential(const uint8_t* const* src, int top_k,
                                                           int64_t i) {
  constexpr int kE = Pack<T>::kElems;
  float acc[kE];
  load_term<T>(acc, src[0], i);
  for (int k0 = 1; k0 < top_k; k0 += 4) {
    float x[4][kE];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (k0 + u < top_k) load_term<T>(x[u], src[k0 + u], i);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (k0 + u < top_k) {
#pragma unroll
        for (int e = 0; e < kE; ++e) acc[e] += x[u][e];
      }
    }
  }
  return pack_from<T>(acc);
}

template <typename T, int kTopK, int kThreads>
__global__ void __launch_bounds__(kThreads) moe_a2a_combine(MoeCombineArgs a) {
  pdl_wait();
  const MoeA2ASite& site = a.site;
  const MoeA2ARows& rows = site.rows;
  const MoeA2ALayout& l = rows.layout;
  const int rank = site.rank, world = site.world;
  if (site.failed()) return;
  const uint32_t v = next_flag_value(*rows.at<uint32_t>(rank, l.flag_value()));
  int32_t* arrivals = rows.at<int32_t>(rank, l.combine_arrivals());
  const int64_t packs = a.row_bytes / 16;

  // 1. Push the rows to their tokens' ranks, publish, then wait for every source.
  bool signal = blockIdx.x == 0;
  if (a.payload != nullptr) {
    const int32_t* counts = rows.at<int32_t>(rank, l.recv_counters());
    const int lane = blockIdx.x * kThreads + threadIdx.x, team = gridDim.x * kThreads;
    for (int src = 0; src < world; ++src) {
      if (src == rank) continue;
      const int64_t n = counts[src] < a.max_tokens ? counts[src] : a.max_tokens;
      copy_row<16>(rows.row(src) + a.region + rank * a.max_tokens * a.row_bytes,
                   a.payload + src * a.max_tokens * a.row_bytes, n * a.row_bytes, lane, team);
    }
    signal = moe_last_arrival(arrivals, gridDim.x);
  }
  const uint32_t mode = a.payload != nullptr ? kPushBit : 0u;
  if (signal && threadIdx.x < world) {
    if (a.payload == nullptr) __threadfence_system();
    flag_store<MemOrder::kRelease>(rows.flag(threadIdx.x, l.combine_completion_flags(), rank),
                                   v | mode);
  }
  if (!moe_wait_flags(site, l.combine_completion_flags(), v | mode, kPhaseCombine,
                      kFlagValueMask)) {
    return;
  }

  // 2. Sum each local token's rows.
  __shared__ const uint8_t* s_src[MoeA2ALayout::kMaxTopK];
  for (int t = blockIdx.x; t < a.local_tokens; t += gridDim.x) {
    combine_sources(a, t, s_src);
    __syncthreads();
    uint8_t* out = a.out + int64_t{t} * a.row_bytes;
    constexpr int kPacks = kTopK > 0 && kTopK <= 8 ? 2 : 1;
    for (int64_t i = threadIdx.x; i < packs; i += kThreads * kPacks) {
      if constexpr (kTopK > 0) {
        combine_packs<T, kTopK, kPacks>(s_src, out, i, kThreads, packs);
      } else {
        store_pack<T>(out, i, combine_pack_sequential<T>(s_src, a.top_k, i));
      }
    }
    __syncthreads();  // s_src is rewritten by the next token
  }

  // 3. Done reading the rows of this round.
  const int32_t expected = a.payload != nullptr ? 2 * gridDim.x : gridDim.x;
  if (!moe_last_arrival(arrivals, expected)) return;
  if (threadIdx.x < world) {
    flag_store<MemOrder::kRelaxed>(rows.flag(threadIdx.x, l.release_flags(), rank), v);
  }
  if (threadIdx.x == 0) {
    *arrivals = 0;
    *rows.at<uint32_t>(rank, l.flag_value()) = v;
  }
  pdl_trigger();
}

}  // namespace fusedcomm
