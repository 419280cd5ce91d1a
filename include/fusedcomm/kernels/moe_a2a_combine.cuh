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
//   1. Push: copy, in chunks of rows that running blocks take from a counter until none is
//      left (moe_push_rows). The block that completes the last chunk (pull: the first block to
//      run) stores the round's flag value into every rank's combine flags [own rank] (release,
//      system scope), with kPushBit when it pushed: all ranks of a round must use one mode (a
//      rank in the other is reported as a mismatch). Every block then waits until all
//      sources' flags in the own row hold it (acquire). No block waits for a block that may
//      not be resident: every chunk was taken by a block that runs, which copies it and waits
//      for nothing before it counts it; so a grid that the device cannot hold at once (other
//      kernels on other streams) is slower, never stuck.
//   2. Per local token (one block each, grid-stride): out[t] = the fixed-order fp32 sum
//      (proto/combine_sum.cuh) over k of term(target_ranks[t, k], send_indices[t, k]), +0 for a
//      k that sent nothing; one final rounding.
//   3. The last block to finish reading stores the value into every rank's release flags
//      [own rank], so the next dispatch may overwrite the rows.
// The push writes only combine regions, which no rank reads before this round's flags: the
// dispatch's release wait already ordered this round after every rank's reads of the last.
// Ranks outside the round's active mask (the dispatch's) are neither pushed to, signalled nor
// waited for.
// kTopK: the compile-time top_k of a pairwise tree; 0: any top_k, summed sequentially.
// kWire: the rows are on the low-precision wire (each slot: H E4M3 codes, then H/32 UE8M0
// scales, MXFP8 of the payload row; kernels/moe_a2a_quantize.cuh writes them into the own
// region before this kernel runs): always pulled, every term decoded exactly to fp32 before the
// same sum, a bfloat16 output (T), combine flags with kLowBit.
#pragma once
#include <cuda_fp16.h>
#include <cuda_fp8.h>

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

// Eight values of a wire row (pack i of the output): codes [8i, 8i + 8), the scale of their
// block at byte hidden + i / 4; exact (an E4M3 value times a power of two).
__device__ __forceinline__ void load_wire(float (&x)[8], const uint8_t* src, int64_t i,
                                          int64_t hidden) {
  if (src == nullptr) {
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = 0.0f;
    return;
  }
  const uint2 c = reinterpret_cast<const uint2*>(src)[i];
  const float scale = __uint_as_float(static_cast<uint32_t>(src[hidden + i / 4]) << 23);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const uint32_t b = ((e < 4 ? c.x : c.y) >> (8 * (e % 4))) & 0xffu;
    const __half h(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3));
    x[e] = __half2float(h) * scale;
  }
}

// One pack of one token from wire rows: the pairwise tree of kTopK terms, or (kTopK 0) the
// sequential sum of top_k.
template <int kTopK>
__device__ __forceinline__ Pack<__nv_bfloat16> combine_pack_wire(const uint8_t* const* src,
                                                                 int top_k, int64_t i,
                                                                 int64_t hidden) {
  float sum[8];
  if constexpr (kTopK > 0) {
    float x[kTopK][8];
#pragma unroll
    for (int k = 0; k < kTopK; ++k) load_wire(x[k], src[k], i, hidden);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float acc[kTopK];
#pragma unroll
      for (int k = 0; k < kTopK; ++k) acc[k] = x[k][e];
      sum[e] = combine_sum<kTopK>(acc);
    }
  } else {
    load_wire(sum, src[0], i, hidden);
    for (int k = 1; k < top_k; ++k) {
      float x[8];
      load_wire(x, src[k], i, hidden);
#pragma unroll
      for (int e = 0; e < 8; ++e) sum[e] += x[e];
    }
  }
  return pack_from<__nv_bfloat16>(sum);
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

// Step 1 of a push: copy the rows [src, j < recv_count[src]] of the payload (every source but
// this rank) to row [rank, j] of src's combine region. The rows of all sources, in source
// order, are cut into chunks of about kChunkBytes; the block takes chunks from `claims` until
// none is left, copies each, then adds its count to `done`. True in every thread of the one
// block whose addition completes the chunks (with no chunk at all: of the block that took
// the first claim); everything the grid pushed is released at system scope before.
template <int kThreads>
__device__ __forceinline__ bool moe_push_rows(const MoeCombineArgs& a, int32_t* claims,
                                              int32_t* done) {
  constexpr int64_t kChunkBytes = 64 * 1024;
  const MoeA2ARows& rows = a.site.rows;
  const int rank = a.site.rank, world = a.site.world;
  __shared__ int64_t s_first[MoeA2ALayout::kMaxKernelRanks + 1];  // rows before source s
  __shared__ int32_t s_claim;
  __shared__ int s_signal;
  if (threadIdx.x == 0) {
    const int32_t* counts = rows.at<int32_t>(rank, rows.layout.recv_counters());
    int64_t total = 0;
    for (int s = 0; s < world; ++s) {
      s_first[s] = total;
      const int64_t n = counts[s] < a.max_tokens ? counts[s] : a.max_tokens;
      total += s == rank || n < 0 || !a.site.is_active(s) ? 0 : n;
    }
    s_first[world] = total;
  }
  __syncthreads();
  const int64_t total = s_first[world];
  const int64_t per_chunk = a.row_bytes >= kChunkBytes ? 1 : kChunkBytes / a.row_bytes;
  const int64_t chunks = (total + per_chunk - 1) / per_chunk;
  int32_t copied = 0, first = -1;
  for (;;) {
    if (threadIdx.x == 0) s_claim = atomicAdd(claims, 1);
    __syncthreads();
    const int64_t c = s_claim;
    __syncthreads();  // s_claim is rewritten by the next claim
    if (first < 0) first = static_cast<int32_t>(c);
    if (c >= chunks) break;
    int64_t r = c * per_chunk;
    const int64_t end = r + per_chunk < total ? r + per_chunk : total;
    int src = 0;
    while (r < end) {
      while (r >= s_first[src + 1]) ++src;  // sources of no rows are skipped
      const int64_t j = r - s_first[src];
      const int64_t n = (end < s_first[src + 1] ? end : s_first[src + 1]) - r;
      copy_row<16>(rows.row(src) + a.region + (rank * a.max_tokens + j) * a.row_bytes,
                   a.payload + (src * a.max_tokens + j) * a.row_bytes, n * a.row_bytes, threadIdx.x,
                   kThreads);
      r += n;
    }
    ++copied;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    if (chunks == 0) {
      s_signal = first == 0;
    } else {
      s_signal = copied > 0 && atomicAdd(done, copied) + copied == chunks;
    }
    if (s_signal) __threadfence();
  }
  __syncthreads();
  return s_signal;
}

// True in every thread of the first block of the grid to get here (by `counter`).
__device__ __forceinline__ bool moe_first_arrival(int32_t* counter) {
  __shared__ int first;
  if (threadIdx.x == 0) first = atomicAdd(counter, 1) == 0;
  __syncthreads();
  return first;
}

template <typename T, int kTopK, int kThreads, bool kWire = false>
__global__ void __launch_bounds__(kThreads) moe_a2a_combine(MoeCombineArgs a) {
  static_assert(!kWire || sizeof(T) == 2, "wire rows come back as bfloat16");
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
  int32_t* claims = rows.at<int32_t>(rank, l.combine_claims());
  const bool signal =
      a.payload != nullptr
          ? moe_push_rows<kThreads>(a, claims, rows.at<int32_t>(rank, l.combine_done()))
          : moe_first_arrival(claims);
  const uint32_t mode = kWire ? kLowBit : a.payload != nullptr ? kPushBit : 0u;
  if (signal && threadIdx.x < world && site.is_active(threadIdx.x)) {
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
      if constexpr (kWire) {
        for (int64_t p = i; p < packs && p < i + kThreads * kPacks; p += kThreads) {
          store_pack<T>(out, p, combine_pack_wire<kTopK>(s_src, a.top_k, p, a.row_bytes / 2));
        }
      } else if constexpr (kTopK > 0) {
        combine_packs<T, kTopK, kPacks>(s_src, out, i, kThreads, packs);
      } else {
        store_pack<T>(out, i, combine_pack_sequential<T>(s_src, a.top_k, i));
      }
    }
    __syncthreads();  // s_src is rewritten by the next token
  }

  // 3. Done reading the rows of this round (every block has arrived: none takes a claim any
  //    more, so the counters are reset for the next combine).
  if (!moe_last_arrival(arrivals, gridDim.x)) return;
  if (threadIdx.x < world && site.is_active(threadIdx.x)) {
    flag_store<MemOrder::kRelaxed>(rows.flag(threadIdx.x, l.release_flags(), rank), v);
  }
  if (threadIdx.x == 0) {
    *arrivals = 0;
    *claims = 0;
    *rows.at<int32_t>(rank, l.combine_done()) = 0;
    *rows.at<uint32_t>(rank, l.flag_value()) = v;
  }
  pdl_trigger();
}

}  // namespace fusedcomm
