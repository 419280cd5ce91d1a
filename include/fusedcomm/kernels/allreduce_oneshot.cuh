// allreduce_oneshot: every rank reads every rank's input and sums in rank order.
//
//   stage (optional): copy own input into the shared buffer, the packs this block will read
//   meet (release)  : peers' staged packs are visible
//   reduce          : out[i] = sum over q = 0..world-1 of in_q[i], fp32 accumulation
//   meet (relaxed)  : nobody reuses its buffer while a peer still reads it
// The sum order is the same on every rank, so all ranks get bit-identical results.
#pragma once
#include "fusedcomm/common/vec.cuh"
#include "fusedcomm/kernels/allreduce_args.cuh"
#include "fusedcomm/sync/peer_barrier.cuh"

namespace fusedcomm {

// Packs a thread keeps in flight per rank: enough loads outstanding to cover NVLink latency
// without spilling registers.
template <int kWorld>
constexpr int kOneshotUnroll = kRankSlots<kWorld> <= 2 ? 4 : (kRankSlots<kWorld> <= 4 ? 2 : 1);

template <typename T, int kWorld>
__global__ void __launch_bounds__(512, 1) allreduce_oneshot(AllReduceArgs a) {
  constexpr int kSlots = kRankSlots<kWorld>;
  constexpr int kUnroll = kOneshotUnroll<kWorld>;
  const int world = world_of<kWorld>(a);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const void* own = a.stage_from != nullptr ? a.stage_from : a.inputs->ptrs[a.rank];

  if (a.stage_from != nullptr) {
    void* shared = const_cast<void*>(a.inputs->ptrs[a.rank]);
    for (int64_t i = first; i < a.num_packs; i += stride) {
      store_pack<T>(shared, i, load_pack<T>(a.stage_from, i));
    }
  }
  if (!cta_meet<MemOrder::kRelease>(a.self, a.peers, a.rank, world, a.site, kPhaseStart)) return;

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
