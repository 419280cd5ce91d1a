// The state behind a vLLM all-reduce handle, shared by vllm_ar.cu and vllm_ar_graph.cu.
#pragma once
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "ffi_utils.h"
#include "vllm_ar.h"

namespace fusedcomm {

// One handle per communicator. Calls on one handle must come from one thread at a time (the
// state below is not locked); the registry of live handles is.
struct VllmHandle {
  int rank = 0;
  int world = 0;
  int device = 0;
  bool full_nvlink = false;
  PeerSignal* self = nullptr;
  PeerSignal* peers[kMaxRanks] = {};
  RankPointers* records = nullptr;
  int64_t capacity = 0;
  int64_t used = 0;
  std::unordered_map<const void*, RankPointers*> registered;
  std::vector<std::pair<const void*, RankPointers*>> pending_graph_inputs;
  std::map<std::string, char*> opened;  // IPC handle bytes -> mapped allocation base
  FailureState failure{};
  uint64_t timeout_ns = 0;
};

// Live handles by id. Ids count up from 1 and are never reused, so a stale id never names a
// newer handle.
inline std::mutex g_mutex;
inline std::unordered_map<int64_t, VllmHandle*> g_handles;
inline int64_t g_next_id = 1;

inline int64_t add_handle(VllmHandle* h) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int64_t id = g_next_id++;
  g_handles.emplace(id, h);
  return id;
}

// The live handle `fa`; with `remove`, also take it out of the registry (atomically).
inline VllmHandle* handle_of(int64_t fa, const char* op, bool remove = false) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_handles.find(fa);
  FC_CHECK_VALUE(it != g_handles.end(), op) << "fa (" << fa << ") is not a live handle "
                                            << "(never created, or already disposed)";
  VllmHandle* h = it->second;
  if (remove) g_handles.erase(it);
  return h;
}

class DeviceScope {
 public:
  DeviceScope(int device, const char* op) {
    FC_CUDA_CHECK(cudaGetDevice(&previous_), op);
    if (previous_ != device) FC_CUDA_CHECK(cudaSetDevice(device), op);
    device_ = device;
  }
  ~DeviceScope() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
  int device_ = 0;
};

inline RankPointers* take_record(VllmHandle* h, const char* op) {
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
