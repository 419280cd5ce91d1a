// Rank-ordered reduction over peer pointers: the data mover of the peer-to-peer all-reduces.
//
//   PeerSources<kSlots> src(own, inputs, rank, world)   where each rank's input lives
//   reduce_packs<T, kSlots, kUnroll>(src, world, offset, first, stride, n, epilogue)
// Every rank sums ranks 0, 1, ..., world-1 in that order with fp32 accumulation (the first value
// upcast, then +=) and rounds once, so all ranks get bit-identical results.
#pragma once
#include "fusedcomm/common/vec.cuh"
#include "fusedcomm/layout/peer_signal.cuh"

namespace fusedcomm {

// Rank-count bound for unrolled loops: the exact count when specialised (kWorld > 0), else the
// maximum.
template <int kWorld>
constexpr int kRankSlots = kWorld > 0 ? kWorld : kMaxRanks;

template <int kSlots>
struct PeerSources {
  const void* ptr[kSlots];

  // `own` replaces this rank's entry (e.g. the caller's unstaged input).
  __device__ __forceinline__ PeerSources(const RankPointers& inputs, const void* own, int rank,
                                         int world) {
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      ptr[q] = q < world ? (q == rank ? own : inputs.ptrs[q]) : nullptr;
    }
  }
};

// For i = first, first + stride, ... below n: sums pack offset + i over ranks in rank order and
// calls epilogue(i, sum). kUnroll iterations issue all their loads before the first add, so
// kUnroll * world loads are in flight per thread.
template <typename T, int kSlots, int kUnroll, typename Epilogue>
__device__ __forceinline__ void reduce_packs(const PeerSources<kSlots>& src, int world,
                                             int64_t offset, int64_t first, int64_t stride,
                                             int64_t n, Epilogue&& epilogue) {
  for (int64_t base = first; base < n; base += stride * kUnroll) {
    Pack<T> in[kUnroll][kSlots];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
#pragma unroll
      for (int q = 0; q < kSlots; ++q) {
        if (i < n && q < world) in[u][q] = load_pack<T>(src.ptr[q], offset + i);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < n) {
        float acc[Pack<T>::kElems];
        unpack_to(in[u][0], acc);
#pragma unroll
        for (int q = 1; q < kSlots; ++q) {
          if (q < world) accumulate(acc, in[u][q]);
        }
        epilogue(i, pack_from<T>(acc));
      }
    }
  }
}

}  // namespace fusedcomm
