// allreduce_oneshot: every rank reads every rank's input and sums in rank order.
//
//   (a failed communicator does nothing, not even stage)
//   stage (optional): copy own input into the shared buffer, the packs this block will read
//   meet            : peers have arrived (release/acquire when packs were staged)
//   reduce          : out[i] = Epilogue(sum over q = 0..world-1 of in_q[i]), fp32 accumulation
//   meet (relaxed)  : nobody reuses its buffer while a peer still reads it
// The sum order is the same on every rank, so all ranks get bit-identical results.
#pragma once
#include "fusedcomm/epilogue/identity.cuh"
#include "fusedcomm/kernels/allreduce_args.cuh"
#include "fusedcomm/proto/reduce.cuh"
#include "fusedcomm/proto/stage.cuh"
#include "fusedcomm/sync/meeting.cuh"

namespace fusedcomm {

template <typename T, int kWorld, int kUnroll, typename Epilogue = Identity>
__global__ void __launch_bounds__(kPeerThreads, 1)
    allreduce_oneshot(const __grid_constant__ AllReduceArgs a) {
  const FailureSite& site = a.site;
  const PeerThread<kWorld> t(a);
  if (t.failed) return;
  const void* own = a.stage_from != nullptr ? a.stage_from : a.inputs->ptrs[t.rank];
  constexpr uint32_t kStart = peer_tag(kPeerOneshot, kPeerStart);

  // Staged packs are handed to the peers (release); registered inputs were complete before
  // the launch, so the meeting only has to say "here" (relaxed).
  bool met;
  if (a.stage_from != nullptr) {
    stage_packs<4>(const_cast<void*>(a.inputs->ptrs[t.rank]), a.stage_from, t.first, t.stride,
                   a.num_packs);
    met = cta_meet<MemOrder::kRelease>(a.self, a.peers, site, kStart, kPeerStart);
  } else {
    met = cta_meet<MemOrder::kRelaxed>(a.self, a.peers, site, kStart, kPeerStart);
  }
  if (!met) return;

  const PeerSources<kRankSlots<kWorld>> src(*a.inputs, own, t.rank, t.world);
  const Epilogue epilogue{};
  reduce_packs<T, kRankSlots<kWorld>, kUnroll>(
      src, t.world, 0, t.first, t.stride, a.num_packs,
      [&](int64_t i, const Pack<T>& sum) { store_pack<T>(a.out, i, epilogue(sum)); });
  cta_meet<MemOrder::kRelaxed>(a.self, a.peers, site, peer_tag(kPeerOneshot, kPeerEnd), kPeerEnd);
}

}  // namespace fusedcomm
