// allreduce_oneshot: every rank reads every rank's input and sums in rank order.
//
//   stage (optional): copy own input into the shared buffer, the packs this block will read
//   meet            : peers have arrived (release/acquire when packs were staged)
//   reduce          : out[i] = sum over q = 0..world-1 of in_q[i], fp32 accumulation
//   meet (relaxed)  : nobody reuses its buffer while a peer still reads it
// The sum order is the same on every rank, so all ranks get bit-identical results.
#pragma once
#include "fusedcomm/common/vec.cuh"
#include "fusedcomm/kernels/allreduce_args.cuh"
#include "fusedcomm/sync/peer_barrier.cuh"

namespace fusedcomm {

// Packs a thread keeps in flight per rank: enough loads outstanding to cover NVLink latency
// without spilling registers (FC_ONESHOT_UNROLL overrides the 2-rank value when tuning).
#ifndef FC_ONESHOT_UNROLL
#define FC_ONESHOT_UNROLL 4
#endif
template <int kWorld>
constexpr int kOneshotUnroll =
    kRankSlots<kWorld> <= 2 ? FC_ONESHOT_UNROLL : (kRankSlots<kWorld> <= 4 ? 2 : 1);

// Copy this block's share of the input into the shared buffer, kUnroll packs in flight.
template <typename T, int kUnroll>
__device__ __forceinline__ void stage_packs(void* dst, const void* src, int64_t first,
                                            int64_t stride, int64_t n) {
  for (int64_t base = first; base < n; base += stride * kUnroll) {
    Pack<T> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * stride < n) v[u] = load_pack<T>(src, base + u * stride);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * stride < n) store_pack<T>(dst, base + u * stride, v[u]);
    }
  }
}

template <typename T, int kWorld>
__global__ void __launch_bounds__(kAllReduceMaxThreads, 1) allreduce_oneshot(AllReduceArgs a) {
  constexpr int kSlots = kRankSlots<kWorld>;
  constexpr int kUnroll = kOneshotUnroll<kWorld>;
  const int world = world_of<kWorld>(a);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const void* own = a.stage_from != nullptr ? a.stage_from : a.inputs->ptrs[a.rank];

  // Staged packs are handed to the peers (release); registered inputs were complete before
  // the launch, so the meeting only has to say "here" (relaxed).
  bool met;
  if (a.stage_from != nullptr) {
    stage_packs<T, 4>(const_cast<void*>(a.inputs->ptrs[a.rank]), a.stage_from, first, stride,
                      a.num_packs);
    met = cta_meet<MemOrder::kRelease>(a.self, a.peers, a.rank, world, a.site, kPhaseStart);
  } else {
    met = cta_meet<MemOrder::kRelaxed>(a.self, a.peers, a.rank, world, a.site, kPhaseStart);
  }
  if (!met) return;

  const void* src[kSlots];
#pragma unroll
  for (int q = 0; q < kSlots; ++q) src[q] = (q < world) ? (q == a.rank ? own : a.inputs->ptrs[q]) : nullptr;

  for (int64_t base = first; base < a.num_packs; base += stride * kUnroll) {
    Pack<T> in[kUnroll][kSlots];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < a.num_packs) {
#pragma unroll
        for (int q = 0; q < kSlots; ++q) {
          if (q < world) in[u][q] = load_pack<T>(src[q], i);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < a.num_packs) {
        float acc[Pack<T>::kElems];
        unpack_to(in[u][0], acc);
#pragma unroll
        for (int q = 1; q < kSlots; ++q) {
          if (q < world) accumulate(acc, in[u][q]);
        }
        store_pack<T>(a.out, i, pack_from<T>(acc));
      }
    }
  }
  cta_meet<MemOrder::kRelaxed>(a.self, a.peers, a.rank, world, a.site, kPhaseEnd);
}

}  // namespace fusedcomm
