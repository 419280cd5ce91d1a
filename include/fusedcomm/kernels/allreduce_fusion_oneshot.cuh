// allreduce_fusion_oneshot: Lamport one-shot all-reduce + fused epilogue.
//
// Block b handles token row b; thread t holds packs t, t + B, ... of the row in registers.
//   pdl_wait, read the table and control block (f = segment, c = packs to clear)
//   (a failed communicator does nothing)
//   announce  : block 0 tells the peers "call n, one-shot"
//   load      : our row (the input, or the MoE prologue's sum), sanitised (-0 -> +0)
//   push      : the row into segment f of every peer at our slot (MoE calls with few tokens:
//               `split` blocks per token each compute a slice of the prologue and push it to
//               every rank, ours included; only the token's last block goes on past clear)
//               [rank*L + row]; our own slot is never written: we sum our sanitised registers
//   clear     : the first c packs of our segment (f+2)%3 (the previous call's) get the sentinel
//   pull      : each peer's pack from our segment f (bounded wait; a peer that announced this
//               call with two-shot is a mismatch), summed in rank order (RankSum)
//   epilogue  : the pattern's (in registers), outputs written
//   finish    : the last block advances f and sets c = W*L (in packs)
// Safety: a rank is at most one call ahead of any peer, so with three segments it never
// writes into a segment a peer still reads or has not cleared yet.
#pragma once
#include "fusedcomm/kernels/allreduce_fusion_args.cuh"
#include "fusedcomm/proto/announce.cuh"
#include "fusedcomm/proto/lamport.cuh"
#include "fusedcomm/proto/rank_sum.cuh"
#include "fusedcomm/proto/reduce.cuh"

namespace fusedcomm {

// The MoE prologue of one slice of a token's row, pushed to every rank's segment f at our slot
// (our own segment included: the token's last block pulls the whole row). Slice k of `split`
// covers packs [k*P/split, (k+1)*P/split).
template <typename T, int kWorld, int kPattern>
__device__ __forceinline__ void push_moe_slice(const FusionArgs& a, const FusionCall& call,
                                               int64_t token, int slice, int split) {
  if constexpr (PatternTraits<kPattern>::kMoe) {
    const FusionShared& s = *call.s;
    const int packs = call.packs;
    const int lo = static_cast<int>(int64_t(slice) * packs / split);
    const int hi = static_cast<int>(int64_t(slice + 1) * packs / split);
    const int64_t at = call.rank * call.slot_packs + token * packs;
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      Pack<T> v;
      if constexpr (PatternTraits<kPattern>::kInput == Input::kMoeReduction) {
        v = a.moe_reduction.compute_pack<T>(token, a.token_num, packs, i);
      } else {
        v = a.moe_finalize.compute_pack<T>(token, a.token_num, packs, i);
      }
#pragma unroll
      for (int d = 0; d < kRankSlots<kWorld>; ++d) {
        if (d >= call.world) break;
        const int q = (call.rank + d) % call.world;
        lamport_push<T>(FusionLayout::segment_at(s.lamport[q], a.segment_bytes, s.segment), at + i,
                        v);
      }
    }
  }
}

template <typename T, int kWorld, int kPattern, int kPacks>
__global__ void __launch_bounds__(kFusionMaxThreads, 1)
    allreduce_fusion_oneshot(const __grid_constant__ FusionArgs a) {
  const FusionCall call = begin_call<kWorld>(a);
  FusionShared& s = *call.s;
  if (s.dead) return;
  const float qscale = quant_scale<kPattern>(a);  // loaded now: its latency hides behind the push
  // MoE calls with few tokens spread a token's prologue over `split` blocks (a.moe_split)
  const int split = PatternTraits<kPattern>::kMoe ? a.moe_split : 1;
  const bool sliced = split > 1;
  const int64_t token = blockIdx.x / split;
  const int world = call.world, rank = call.rank, packs = call.packs;
  const int64_t slot_packs = call.slot_packs;  // L in packs
  const int64_t row = token * packs;
  const uint32_t word = fusion_call_word(s.call, kFusionOneshot, call.digest);
  if (blockIdx.x == 0 && threadIdx.x == 0) announce_call(s.flags, rank, world, word);

  // push
  Row<T, kPacks> mine;
  if (sliced) {
    push_moe_slice<T, kWorld, kPattern>(a, call, token, blockIdx.x % split, split);
  } else {
    load_input<kPattern>(mine, a, token);
#pragma unroll
    for (int d = 1; d < kRankSlots<kWorld>; ++d) {
      if (d >= world) break;
      const int q = (rank + d) % world;
      void* dst = FusionLayout::segment_at(s.lamport[q], a.segment_bytes, s.segment);
#pragma unroll
      for (int j = 0; j < kPacks; ++j) {
        if (Row<T, kPacks>::has(j, packs)) {
          lamport_push<T>(dst, rank * slot_packs + row + Row<T, kPacks>::index(j), mine.v[j]);
        }
      }
    }
  }

  // clear the previous call's segment (grid-stride over every block)
  {
    void* prev = FusionLayout::segment_at(s.lamport[rank], a.segment_bytes, (s.segment + 2) % 3);
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < s.clear_packs;
         i += stride) {
      lamport_clear<float>(prev, i);  // fp32 sentinel words: empty for every element type
    }
  }
  // the token's last block does the rest: the blocks it waits for were dispatched before it,
  // so it never holds an SM that one of them needs
  if (sliced && blockIdx.x % split != split - 1) {
    finish_call(a, s, /*oneshot=*/true, world * slot_packs);
    return;
  }

  // pull and sum in rank order (our own slot too when the row was pushed in slices)
  const void* own = FusionLayout::segment_at(s.lamport[rank], a.segment_bytes, s.segment);
  bool ok = true;  // the sum replaces our pack in `mine` (one row of registers)
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    if (!ok || !Row<T, kPacks>::has(j, packs)) continue;
    const int64_t i = row + Row<T, kPacks>::index(j);
    Pack<T> first = mine.v[j];
    if (rank != 0 || sliced)
      ok = lamport_pull_announced<T>(s.site, 0, kFusionPull, own, i, first, s.flags[rank], word);
    RankSum<T> acc(first, a.fp32_acc);
#pragma unroll
    for (int q = 1; q < kRankSlots<kWorld>; ++q) {
      if (q >= world || !ok) break;
      Pack<T> x = mine.v[j];
      if (q != rank || sliced)
        ok = lamport_pull_announced<T>(s.site, q, kFusionPull, own, q * slot_packs + i, x,
                                       s.flags[rank], word);
      acc.add(x);
    }
    mine.v[j] = acc.result();
  }
  if (!__syncthreads_and(ok)) return;

  run_epilogue<kPattern>(mine, a, token, qscale);
  finish_call(a, s, /*oneshot=*/true, world * slot_packs);
}

}  // namespace fusedcomm
