// allreduce_twoshot: reduce-scatter, then all-gather.
//
// The message is cut into `world` contiguous parts; part k = packs [k*part, k*part + size_k),
// the last part also takes the remainder.
//   (a failed communicator does nothing, not even stage)
//   stage (optional): copy own input into the shared buffer (every part but our own, which we
//                     read from the caller's input directly)
//   meet (release)  : staged packs are visible
//   reduce-scatter  : rank r sums part r over all ranks (rank order, fp32) into its scratch
//                     (right after its signal header) and into out
//   meet (release)  : partial sums are visible
//   all-gather      : copy part k from rank k's scratch into out, for every k != r
//   meet (relaxed)  : nobody overwrites its scratch while a peer still reads it
// Each part is summed once, on its owner, so all ranks get bit-identical results.
//
// Why the last meeting stays: without it, the next call's reduce-scatter (after that call's
// first meeting) could overwrite scratch a peer still copies. Block b of the next call meets
// only block b of each peer, and the packs block b writes are the packs block b of the peers
// read only when both calls have the same grid; the grid follows the message size and
// num_ctas, which change from call to call. The meeting is one NVLink round trip (~1 us).
#pragma once
#include "fusedcomm/epilogue/identity.cuh"
#include "fusedcomm/kernels/allreduce_args.cuh"
#include "fusedcomm/proto/reduce.cuh"
#include "fusedcomm/proto/stage.cuh"
#include "fusedcomm/sync/meeting.cuh"

namespace fusedcomm {

template <typename T, int kWorld, typename Epilogue = Identity>
__global__ void __launch_bounds__(kPeerThreads, 1)
    allreduce_twoshot(const __grid_constant__ AllReduceArgs a) {
  const FailureSite& site = a.site;
  const PeerThread<kWorld> t(a);
  if (t.failed) return;
  const int64_t part = a.num_packs / t.world;
  const int64_t last_size = a.num_packs - part * (t.world - 1);
  auto part_size = [&](int k) { return k == t.world - 1 ? last_size : part; };
  auto packs_at = [](const void* base, int64_t pack) {
    return static_cast<const uint4*>(base) + pack;
  };

  if (a.stage_from != nullptr) {
    void* shared = const_cast<void*>(a.inputs->ptrs[t.rank]);
    for (int k = 0; k < t.world; ++k) {
      if (k == t.rank) continue;
      stage_packs<2>(const_cast<uint4*>(packs_at(shared, k * part)),
                     packs_at(a.stage_from, k * part), t.first, t.stride, part_size(k));
    }
  }
  if (!cta_meet<MemOrder::kRelease>(a.self, a.peers, site, peer_tag(kPeerTwoshot, kPeerStart),
                                    kPeerStart)) {
    return;
  }

  const void* own = a.stage_from != nullptr ? a.stage_from : a.inputs->ptrs[t.rank];
  const PeerSources<kRankSlots<kWorld>> src(*a.inputs, own, t.rank, t.world);
  const int64_t mine = t.rank * part;
  void* scratch = scratch_after(a.self);
  const Epilogue epilogue{};
  reduce_packs<T, kRankSlots<kWorld>, 1>(src, t.world, mine, t.first, t.stride, part_size(t.rank),
                                         [&](int64_t i, const Pack<T>& sum) {
                                           const Pack<T> v = epilogue(sum);
                                           store_pack<T>(scratch, i, v);
                                           store_pack<T>(a.out, mine + i, v);
                                         });
  if (!cta_meet<MemOrder::kRelease>(a.self, a.peers, site, peer_tag(kPeerTwoshot, kPeerMiddle),
                                    kPeerMiddle)) {
    return;
  }

  for (int q = 0; q < t.world; ++q) {
    if (q == t.rank) continue;
    stage_packs<4>(const_cast<uint4*>(packs_at(a.out, q * part)), scratch_after(a.peers[q]),
                   t.first, t.stride, part_size(q));
  }
  cta_meet<MemOrder::kRelaxed>(a.self, a.peers, site, peer_tag(kPeerTwoshot, kPeerEnd), kPeerEnd);
}

}  // namespace fusedcomm
