// Launch arguments of the peer-to-peer (vLLM-style) all-reduce kernels.
//
// JIT key (template arguments, one module per combination; see python/fusedcomm/jit/
// allreduce_peer.py): T (fp32, fp16, bf16), kWorld (2, 4, 8, or 0 = any world size up to
// kMaxRanks, read at run time) and kUnroll (packs in flight per rank and thread in one-shot).
// Run-time arguments: everything in AllReduceArgs.
#pragma once
#include "fusedcomm/layout/peer_signal.cuh"
#include "fusedcomm/sync/wait.cuh"

namespace fusedcomm {

// Threads per block; a meeting serves one peer per thread, so it must cover every rank.
constexpr int kPeerThreads = 512;
static_assert(kPeerThreads >= kMaxRanks, "a meeting needs a thread per rank");

// Algorithms (also the meeting tag's high nibble) and phases (its low nibble). The names the
// host prints come from the binding (allreduce_peer_describe), never re-typed in Python.
enum PeerAlgorithm : int32_t { kPeerAuto = 0, kPeerOneshot = 1, kPeerTwoshot = 2 };
enum PeerPhase : int32_t { kPeerStart = 0, kPeerMiddle = 1, kPeerEnd = 2 };
constexpr int32_t kOpPeerAllReduce = 1;

__host__ __device__ constexpr uint32_t peer_tag(PeerAlgorithm algorithm, PeerPhase phase) {
  return (uint32_t(algorithm) << 4) | uint32_t(phase);
}

struct AllReduceArgs {
  const RankPointers* inputs;  // device record: inputs->ptrs[q] = rank q's input, mapped here
  const void* stage_from;      // non-null: first copy this rank's input from here into ptrs[rank]
  void* out;
  PeerSignal* self;
  PeerSignal* peers[kMaxRanks];
  int64_t num_packs;  // 16-byte packs in the message
  FailureSite site;   // also holds rank and world
};

// What every peer all-reduce kernel starts from: its world size, rank and grid-stride place,
// and whether to do nothing. A failed communicator does nothing: staging is the one write
// before the first meeting (which checks the claim itself, overlapped with its own loads), so
// only a staging call reads the claim here.
template <int kWorld>
struct PeerThread {
  int world;
  int rank;
  int64_t first;   // this thread's first pack
  int64_t stride;  // threads in the grid
  bool failed;

  __device__ __forceinline__ explicit PeerThread(const AllReduceArgs& a)
      : world(kWorld > 0 ? kWorld : a.site.world),
        rank(a.site.rank),
        first(int64_t(blockIdx.x) * blockDim.x + threadIdx.x),
        stride(int64_t(gridDim.x) * blockDim.x),
        failed(a.stage_from != nullptr && a.site.failed()) {}
};

}  // namespace fusedcomm
