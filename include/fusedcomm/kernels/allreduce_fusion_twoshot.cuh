// allreduce_fusion_twoshot: reduce-scatter + all-gather through the comm buffers, then the
// fused epilogue (a barrier-flag two-shot with per-block meetings instead of grid-wide flags).
//
// Block b of G handles token rows b, b + G, ... in every phase, on every rank; row t is cut
// into W parts of packs, part k = [k*P/W, (k+1)*P/W) (P = packs per row).
//   pdl_wait, table and control block; (a failed communicator does nothing)
//   announce : block 0 tells the peers "call n, two-shot"
//   stage    : our rows' sanitised packs, all parts but ours, into our comm [0, L)
//   meet     : (release) block b of every rank has staged
//   reduce   : part `rank` of our rows: sum in rank order over every rank's staged packs
//              (ours from the input) and store it into comm [L, 2L) of every rank
//   meet     : (release) every part of our rows has arrived in our comm [L, 2L)
//   epilogue : each row from our comm [L, 2L) into registers, then the pattern's epilogue
//   finish   : the last block counts the call
// The meetings carry the algorithm in their tag. No closing meeting is needed: a peer writes
// our comm buffer only after the first meeting of its next call, which our block reaches only
// once this whole kernel has completed (calls of a workspace run in stream order).
#pragma once
#include "fusedcomm/kernels/allreduce_fusion_args.cuh"
#include "fusedcomm/proto/announce.cuh"
#include "fusedcomm/proto/rank_sum.cuh"
#include "fusedcomm/proto/reduce.cuh"
#include "fusedcomm/sync/meeting.cuh"

namespace fusedcomm {

template <typename T, int kWorld, int kPattern, int kPacks>
__global__ void __launch_bounds__(kFusionMaxThreads, 1)
    allreduce_fusion_twoshot(const __grid_constant__ FusionArgs a) {
  static_assert(!PatternTraits<kPattern>::kMoe, "the MoE fusions run one-shot only");
  const FusionCall call = begin_call<kWorld>(a);
  FusionShared& s = *call.s;
  if (s.dead) return;
  const float qscale = quant_scale<kPattern>(a);  // loaded now: its latency hides behind staging
  const int world = call.world, rank = call.rank, packs = call.packs;
  const int64_t slot_packs = call.slot_packs;  // L in packs
  const int64_t first_row = blockIdx.x, row_stride = gridDim.x;
  auto part_begin = [&](int k) { return static_cast<int>(int64_t(k) * packs / world); };
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    announce_call(s.flags, rank, world, fusion_call_word(s.call, kFusionTwoshot, call.digest));
  }

  // stage every part but ours
  const int own_begin = part_begin(rank), own_end = part_begin(rank + 1);
  for (int64_t t = first_row; t < a.token_num; t += row_stride) {
    for (int i = threadIdx.x; i < packs; i += blockDim.x) {
      if (i >= own_begin && i < own_end) continue;
      const int64_t p = t * packs + i;
      store_pack<T>(s.comm[rank], p, lamport_sanitize(load_pack<T>(a.input, p)));
    }
  }
  if (!cta_meet<MemOrder::kRelease>(s.meet[rank], s.meet, s.site,
                                    fusion_tag(kFusionTwoshot, kFusionStaged), kFusionStaged)) {
    return;
  }

  // reduce our part of our rows into every rank's second half
  const int own_packs = own_end - own_begin;
  for (int64_t t = first_row; t < a.token_num; t += row_stride) {
    for (int i = threadIdx.x; i < own_packs; i += blockDim.x) {
      const int64_t p = t * packs + own_begin + i;
      const Pack<T> mine = lamport_sanitize(load_pack<T>(a.input, p));
      RankSum<T> acc(rank == 0 ? mine : load_pack<T>(s.comm[0], p), a.fp32_acc);
#pragma unroll
      for (int q = 1; q < kRankSlots<kWorld>; ++q) {
        if (q >= world) break;
        acc.add(q == rank ? mine : load_pack<T>(s.comm[q], p));
      }
      const Pack<T> sum = acc.result();
#pragma unroll
      for (int q = 0; q < kRankSlots<kWorld>; ++q) {
        if (q >= world) break;
        store_pack<T>(s.comm[q], slot_packs + p, sum);
      }
    }
  }
  if (!cta_meet<MemOrder::kRelease>(s.meet[rank], s.meet, s.site,
                                    fusion_tag(kFusionTwoshot, kFusionReduced), kFusionReduced)) {
    return;
  }

  // epilogue, one row at a time in registers
  for (int64_t t = first_row; t < a.token_num; t += row_stride) {
    Row<T, kPacks> row;
#pragma unroll
    for (int j = 0; j < kPacks; ++j) {
      if (Row<T, kPacks>::has(j, packs)) {
        row.v[j] = load_pack<T>(s.comm[rank], slot_packs + t * packs + Row<T, kPacks>::index(j));
      }
    }
    run_epilogue<kPattern>(row, a, t, qscale);
  }
  finish_call(a, s, /*oneshot=*/false, 0);
}

}  // namespace fusedcomm
