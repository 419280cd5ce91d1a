// The state behind a peer all-reduce handle, shared by allreduce_peer.cu and
// allreduce_peer_graph.cu, and the launcher type the per-configuration kernel modules export.
#pragma once
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "binding.h"
#include "fusedcomm/kernels/allreduce_args.cuh"

namespace fusedcomm {

// A kernel module (one dtype x world size) exports the address of one of these; the control
// module calls it with a finished AllReduceArgs. kPeerAbi guards against mixing modules built
// from different headers.
using PeerLauncher = cudaError_t (*)(const AllReduceArgs&, PeerAlgorithm, int, cudaStream_t);
constexpr int64_t kPeerAbi = int64_t{20261130} * 4096 + int64_t{sizeof(AllReduceArgs)};

// One handle per communicator. Calls on one handle must come from one thread at a time (the
// state below is not locked); the registry of live handles is.
struct PeerHandle {
  int rank = 0;
  int world = 0;
  int device = 0;
  PeerSignal* self = nullptr;
  PeerSignal* peers[kMaxRanks] = {};
  int64_t scratch_capacity = 0;  // bytes after the own signal header
  RankPointers* records = nullptr;
  int64_t capacity = 0;
  int64_t used = 0;
  std::unordered_map<const void*, RankPointers*> registered;
  std::vector<std::pair<const void*, RankPointers*>> pending_graph_inputs;
  std::map<std::string, char*> opened;  // IPC handle bytes -> mapped allocation base
  FailureSite site{};
  cudaStream_t last_stream = nullptr;  // the stream of the last eager call
  cudaEvent_t order = nullptr;         // orders calls that switch streams
};

inline HandleRegistry<PeerHandle> g_peer_handles;

inline RankPointers* take_record(PeerHandle* h, const char* op) {
  if (h->used >= h->capacity) {
    TVM_FFI_THROW(RuntimeError) << op << ": rank_data holds " << h->capacity
                                << " pointer records and all are in use; pass a larger rank_data";
  }
  return h->records + h->used++;
}

// Writes one pointer record, ordered with the work already queued on the current stream.
inline void write_record(RankPointers* record, const std::vector<const void*>& ptrs, int device,
                         const char* op) {
  RankPointers host{};
  for (size_t q = 0; q < ptrs.size(); ++q) host.ptrs[q] = ptrs[q];
  cudaStream_t stream = stream_for(device);
  FC_CUDA_CHECK(cudaMemcpyAsync(record, &host, sizeof(host), cudaMemcpyHostToDevice, stream), op);
  FC_CUDA_CHECK(cudaStreamSynchronize(stream), op);
}

}  // namespace fusedcomm
