// allreduce_fusion_oneshot: Lamport one-shot all-reduce + fused epilogue (§4.3).
//
// Block b handles token row b; thread t holds packs t, t + B, ... of the row in registers.
//   pdl_wait, read the table and control block (f = segment, c = packs to clear)
//   (a failed communicator does nothing)
//   announce  : block 0 tells the peers "call n, one-shot"
//   load      : our row (the input, or the MoE prologue's sum), sanitised (-0 -> +0)
//   push      : the row into segment f of every peer at our slot
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

template <typename T, int kWorld, int kPattern, int kPacks>
__global__ void __launch_bounds__(kFusionMaxThreads, 1)
    allreduce_fusion_oneshot(const __grid_constant__ FusionArgs a) {
  const int64_t token = blockIdx.x;
  const FusionCall call = begin_call<kWorld>(a);
  FusionShared& s = *call.s;
  if (s.dead) return;
  const int world = call.world, rank = call.rank, packs = call.packs;
  const int64_t slot_packs = call.slot_packs;  // L in packs
  const int64_t row = token * packs;
  const uint32_t word = fusion_call_word(s.call, kFusionOneshot, call.digest);
  if (blockIdx.x == 0 && threadIdx.x == 0) announce_call(s.flags, rank, world, word);

  // push
  Row<T, kPacks> mine;
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

  // clear the previous call's segment (grid-stride over every block)
  {
    void* prev = FusionLayout::segment_at(s.lamport[rank], a.segment_bytes, (s.segment + 2) % 3);
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < s.clear_packs;
         i += stride) {
      lamport_clear<float>(prev, i);  // fp32 sentinel words: empty for every element type
    }
  }

  // pull and sum in rank order
  const void* own = FusionLayout::segment_at(s.lamport[rank], a.segment_bytes, s.segment);
  bool ok = true;  // the sum replaces our pack in `mine` (one row of registers)
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    if (!ok || !Row<T, kPacks>::has(j, packs)) continue;
    const int64_t i = row + Row<T, kPacks>::index(j);
    Pack<T> first = mine.v[j];
    if (rank != 0)
      ok = lamport_pull_announced<T>(s.site, 0, kFusionPull, own, i, first, s.flags[rank], word);
    RankSum<T> acc(first, a.fp32_acc);
#pragma unroll
    for (int q = 1; q < kRankSlots<kWorld>; ++q) {
      if (q >= world || !ok) break;
      Pack<T> x = mine.v[j];
      if (q != rank)
        ok = lamport_pull_announced<T>(s.site, q, kFusionPull, own, q * slot_packs + i, x,
                                       s.flags[rank], word);
      acc.add(x);
    }
    mine.v[j] = acc.result();
  }
  if (!__syncthreads_and(ok)) return;

  run_epilogue<kPattern>(mine, a, token, quant_scale<kPattern>(a));
  finish_call(a, s, /*oneshot=*/true, world * slot_packs);
}

}  // namespace fusedcomm
