// allreduce_twoshot: reduce-scatter, then all-gather.
//
// The message is cut into `world` contiguous parts; part k = packs [k*part, k*part + size_k),
// the last part also takes the remainder.
//   stage (optional): copy own input into the shared buffer (for every other rank's part,
//                     the packs that rank's same-index block will read)
//   meet (release)  : staged packs are visible
//   reduce-scatter  : rank r sums part r over all ranks (rank order, fp32) into its scratch
//                     (right after its signal header) and into out
//   meet (release)  : partial sums are visible
//   all-gather      : copy part k from rank k's scratch into out, for every k != r
//   meet (relaxed)  : nobody reuses its scratch while a peer still reads it
// Each part is summed once, on its owner, so all ranks get bit-identical results.
#pragma once
#include "fusedcomm/common/vec.cuh"
#include "fusedcomm/kernels/allreduce_args.cuh"
#include "fusedcomm/sync/peer_barrier.cuh"

namespace fusedcomm {

template <typename T, int kWorld>
__global__ void __launch_bounds__(kAllReduceMaxThreads, 1) allreduce_twoshot(AllReduceArgs a) {
  constexpr int kSlots = kRankSlots<kWorld>;
  const int world = world_of<kWorld>(a);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t part = a.num_packs / world;
  const int64_t last_size = a.num_packs - part * (world - 1);
  auto part_size = [&](int k) { return k == world - 1 ? last_size : part; };

  if (a.stage_from != nullptr) {
    void* shared = const_cast<void*>(a.inputs->ptrs[a.rank]);
    for (int64_t i = first; i < last_size; i += stride) {
      for (int k = 0; k < world; ++k) {  // part `rank` is read from stage_from directly
        if (k != a.rank && i < part_size(k)) {
          store_pack<T>(shared, k * part + i, load_pack<T>(a.stage_from, k * part + i));
        }
      }
    }
  }
  if (!cta_meet<MemOrder::kRelease>(a.self, a.peers, a.rank, world, a.site, kPhaseStart)) return;

  const void* own = a.stage_from != nullptr ? a.stage_from : a.inputs->ptrs[a.rank];
  const void* src[kSlots];
#pragma unroll
  for (int q = 0; q < kSlots; ++q) src[q] = (q < world) ? (q == a.rank ? own : a.inputs->ptrs[q]) : nullptr;
  const int64_t mine = a.rank * part;
  void* scratch = scratch_after(a.self);
  for (int64_t i = first; i < part_size(a.rank); i += stride) {
    Pack<T> in[kSlots];
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      if (q < world) in[q] = load_pack<T>(src[q], mine + i);
    }
    float acc[Pack<T>::kElems];
    unpack_to(in[0], acc);
#pragma unroll
    for (int q = 1; q < kSlots; ++q) {
      if (q < world) accumulate(acc, in[q]);
    }
    const Pack<T> sum = pack_from<T>(acc);
    store_pack<T>(scratch, i, sum);
    store_pack<T>(a.out, mine + i, sum);
  }
  if (!cta_meet<MemOrder::kRelease>(a.self, a.peers, a.rank, world, a.site, kPhaseMiddle)) return;

  for (int64_t i = first; i < last_size; i += stride) {
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      if (q < world && q != a.rank && i < part_size(q)) {
        store_pack<T>(a.out, q * part + i, load_pack<T>(scratch_after(a.peers[q]), i));
      }
    }
  }
  cta_meet<MemOrder::kRelaxed>(a.self, a.peers, a.rank, world, a.site, kPhaseEnd);
}

}  // namespace fusedcomm
