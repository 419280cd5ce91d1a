// MoE all-to-all dispatch: every rank pushes each local token's payload rows to the ranks that
// own its experts, then waits until every source has done the same.
//
//   1. Wait until every rank has finished reading the previous round (release flags).
//   2. Each block takes tokens blockIdx.x, + gridDim.x, ...: its warps route them
//      (proto/expert_route.cuh) into the own top-k tables, then the block copies each payload
//      row of each token to slot (own rank, slot) of every destination's row, loading it once.
//      The grid is what the device holds at once, so a block's copies run back to back.
// Ranks outside the round's active mask (MoeA2ASite::active) get no tokens, flags or statistics
// and are not waited for; the own recv count of such a source is set to 0. The mask is part of
// the dispatch flag (dispatch_flag), so ranks of the round that disagree on it mismatch.
//   3. The block counts its arrival; the last block writes each destination's token count into
//      the destination's recv counters [own rank], then the round's dispatch flag (the flag
//      value and a tag of R: dispatch_flag) into its dispatch flags [own rank] (release, system
//      scope), resets the send counters for the next round, and waits until every source's
//      flag in the own row holds it (acquire); a source with another R is a mismatch. With
//      EPLB statistics, the block first writes them into row [rank] of every rank's EPLB
//      region, so each rank's own region holds every rank's when the wait ends.
// Slots within a source follow the order of the atomic increments (not deterministic).
#pragma once
#include "fusedcomm/kernels/moe_a2a_args.cuh"
#include "fusedcomm/proto/copy_row.cuh"
#include "fusedcomm/proto/expert_route.cuh"
#include "fusedcomm/proto/pdl.cuh"
#include "fusedcomm/sync/flag.cuh"
#include "fusedcomm/sync/wait.cuh"

namespace fusedcomm {

// Threads [0, world) of the block wait until flag [q] of the own row at `flags` equals `want`;
// `step` (not 0): the bits that name the step, so that a flag equal to `want` on them but not
// elsewhere means the peer runs another variant of the step (a mismatch; same_step in
// kernels/moe_a2a_flags.cuh). Returns the verdict of the whole block.
__device__ __forceinline__ bool moe_wait_flags(const MoeA2ASite& site, int64_t flags, uint32_t want,
                                               int phase, uint32_t step = 0) {
  bool ok = true;
  const int q = threadIdx.x;
  if (q < site.world && site.is_active(q)) {
    const uint32_t* f = site.rows.flag(site.rank, flags, q);
    ok = wait_until(site, q, phase, want, [&](uint32_t& seen) {
      seen = flag_load<MemOrder::kAcquire>(f);
      if (seen == want) return Poll::kReady;
      return step != 0 && same_step(seen, want, step) ? Poll::kMismatch : Poll::kWait;
    });
  }
  return __syncthreads_and(ok);
}

// True in every thread of the one block that arrives last at `counter` (of `expected`).
// Everything the block wrote before is released at system scope first.
__device__ __forceinline__ bool moe_last_arrival(int32_t* counter, int32_t expected) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    last = atomicAdd(counter, 1) == expected - 1;
    if (last) __threadfence();
  }
  __syncthreads();
  return last;
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads, 3) moe_a2a_dispatch(MoeDispatchArgs a) {
  constexpr int kMaxTopK = MoeA2ALayout::kMaxTopK;
  pdl_wait();
  const MoeA2ASite& site = a.site;
  const MoeA2ARows& rows = site.rows;
  const MoeA2ALayout& l = rows.layout;
  const int rank = site.rank, world = site.world;
  if (site.failed()) return;  // a failed workspace does nothing, not even its copies

  // 1. Nobody still reads the previous round (the own rank's release flag is the newest).
  const uint32_t released = ld_relaxed_sys(rows.flag(rank, l.release_flags(), rank));
  if (!moe_wait_flags(site, l.release_flags(), released, kPhaseRelease)) return;
  const uint32_t v = next_flag_value(*rows.at<uint32_t>(rank, l.flag_value()));

  // 2. Route this block's tokens (a warp per token): slots are first counted per destination in
  //    shared memory, then the block takes one run of slots per destination from the counters.
  int32_t* counters = rows.at<int32_t>(rank, l.send_counters());
  int32_t* topk_ranks = rows.at<int32_t>(rank, l.topk_target_ranks());
  int32_t* topk_slots = rows.at<int32_t>(rank, l.topk_send_indices());
  constexpr int kWarps = kThreads / 32;
  constexpr int kMaxRanks = MoeA2ALayout::kMaxKernelRanks;
  __shared__ int32_t s_count[kMaxRanks];
  __shared__ int32_t s_base[kMaxRanks];
  if (threadIdx.x < kMaxRanks) s_count[threadIdx.x] = 0;
  __syncthreads();
  for (int t = blockIdx.x + (threadIdx.x / 32) * gridDim.x; t < a.local_tokens;
       t += kWarps * gridDim.x) {
    uint32_t dests = 0;
    const Route r = route_token(a.experts + int64_t{t} * a.top_k, a.top_k, a.num_experts, world,
                                s_count, a.dropped, dests, site.active);
    const int k = threadIdx.x & 31;
    if (k < a.top_k) {
      topk_ranks[int64_t{t} * kMaxTopK + k] = r.rank;
      topk_slots[int64_t{t} * kMaxTopK + k] = r.slot;  // within the block, for now
    }
  }
  __syncthreads();
  if (threadIdx.x < world && s_count[threadIdx.x] > 0) {
    s_base[threadIdx.x] = atomicAdd(&counters[threadIdx.x], s_count[threadIdx.x]);
  }
  __syncthreads();
  const int mine =
      a.local_tokens > blockIdx.x ? (a.local_tokens - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  for (int i = threadIdx.x; i < mine * a.top_k; i += kThreads) {
    const int64_t at = int64_t{blockIdx.x + (i / a.top_k) * gridDim.x} * kMaxTopK + i % a.top_k;
    const int q = topk_ranks[at];
    if (q >= 0) topk_slots[at] += s_base[q];
  }
  __syncthreads();
  // The destinations of the token being copied, compacted (rank and slot), in shared memory.
  __shared__ int32_t s_rank[kMaxRanks];
  __shared__ int32_t s_slot[kMaxRanks];
  __shared__ int32_t s_dests;
  for (int t = blockIdx.x; t < a.local_tokens; t += gridDim.x) {
    if (threadIdx.x < 32) {
      const int k = threadIdx.x;
      const int64_t at = int64_t{t} * kMaxTopK + k;
      const int q = k < a.top_k ? topk_ranks[at] : -1;
      const uint32_t sends = __ballot_sync(0xffffffffu, q >= 0);
      if (q >= 0) {
        const int d = __popc(sends & ((1u << k) - 1));
        s_rank[d] = q;
        s_slot[d] = topk_slots[at];
      }
      if (k == 0) s_dests = __popc(sends);
    }
    __syncthreads();
    for (int i = 0; i < a.num_payloads; ++i) {
      const int64_t bytes = a.bytes[i];
      uint8_t* const region = rows.base + a.dst[i] + rank * a.max_tokens * bytes;
      auto dst_of = [&](int d) -> uint8_t* {
        return region + s_rank[d] * rows.stride + s_slot[d] * bytes;
      };
      scatter_row_width(a.width[i], dst_of, s_dests, a.src[i] + int64_t{t} * a.src_stride[i], bytes,
                        threadIdx.x, kThreads);
    }
    __syncthreads();  // the next token rewrites the destinations
  }

  // 3. The last block hands the counts over, signals and waits for every source.
  if (!moe_last_arrival(rows.at<int32_t>(rank, l.local_token_counter()), gridDim.x)) return;
  const uint32_t signal = dispatch_flag(v, a.max_tokens, site.active);
  if (a.eplb_count > 0) {
    const int64_t stride = l.eplb_stats_num_experts;
    for (int i = threadIdx.x; i < world * a.eplb_count; i += kThreads) {
      const int dst = i / a.eplb_count, e = i % a.eplb_count;
      if (!site.is_active(dst)) continue;
      rows.at<int32_t>(dst, l.eplb_gathered_stats())[rank * stride + e] = a.eplb_stats[e];
    }
    __threadfence_system();
    __syncthreads();  // released below with the flags
  }
  const int q = threadIdx.x;
  if (q < world && site.is_active(q)) {
    const int32_t count = ld_volatile(&counters[q]);
    st_relaxed_sys(reinterpret_cast<uint32_t*>(rows.at<int32_t>(q, l.recv_counters()) + rank),
                   static_cast<uint32_t>(count));
    flag_store<MemOrder::kRelease>(rows.flag(q, l.dispatch_completion_flags(), rank), signal);
  } else if (q < world) {
    rows.at<int32_t>(rank, l.recv_counters())[q] = 0;  // an excluded source sent nothing
  }
  if (q < world) counters[q] = 0;
  if (threadIdx.x == 0) {
    *rows.at<int32_t>(rank, l.local_token_counter()) = 0;
    *rows.at<uint32_t>(rank, l.flag_value()) = v;
  }
  if (!moe_wait_flags(site, l.dispatch_completion_flags(), signal, kPhaseDispatch, kStepMask)) {
    return;
  }
  pdl_trigger();
}

}  // namespace fusedcomm
