// allreduce_peer (graph part): after CUDA-graph capture, exchange where each captured input
// lives.
//   allreduce_peer_graph_meta(fa) -> [handle bytes (64 per input, signed), offsets]
//   allreduce_peer_register_graph(fa, handles[rank], offsets[rank]) fills the reserved records.
#include <cstring>

#include "allreduce_peer_handle.h"

namespace fusedcomm {

ffi::Array<ffi::Array<int64_t>> allreduce_peer_graph_meta(int64_t fa) {
  constexpr const char* op = "vllm_get_graph_buffer_ipc_meta";
  PeerHandle* h = g_peer_handles.get(fa, op);
  DeviceScope scope(h->device, op);
  ffi::Array<int64_t> handle_bytes;
  ffi::Array<int64_t> offsets;
  for (const auto& entry : h->pending_graph_inputs) {
    CUdeviceptr base = 0;
    size_t size = 0;
    allocation_of(entry.first, &base, &size, op);
    cudaIpcMemHandle_t ipc;
    FC_CUDA_CHECK(cudaIpcGetMemHandle(&ipc, reinterpret_cast<void*>(base)), op);
    for (size_t i = 0; i < sizeof(ipc.reserved); ++i) {
      handle_bytes.push_back(static_cast<int64_t>(static_cast<signed char>(ipc.reserved[i])));
    }
    offsets.push_back(static_cast<int64_t>(reinterpret_cast<CUdeviceptr>(entry.first) - base));
  }
  return ffi::Array<ffi::Array<int64_t>>{handle_bytes, offsets};
}

void allreduce_peer_register_graph(int64_t fa, ffi::Array<ffi::Array<int64_t>> handles,
                                   ffi::Array<ffi::Array<int64_t>> offsets) {
  constexpr const char* op = "vllm_register_graph_buffers";
  PeerHandle* h = g_peer_handles.get(fa, op);
  const size_t n = h->pending_graph_inputs.size();
  FC_CHECK_VALUE(static_cast<int64_t>(handles.size()) == h->world &&
                     static_cast<int64_t>(offsets.size()) == h->world,
                 op)
      << "need one handle list and one offset list per rank (" << h->world << "), got "
      << handles.size() << " and " << offsets.size();
  constexpr size_t kHandleBytes = sizeof(cudaIpcMemHandle_t);
  for (int q = 0; q < h->world; ++q) {
    FC_CHECK_VALUE(handles[q].size() == n * kHandleBytes && offsets[q].size() == n, op)
        << "rank " << q << " sent " << offsets[q].size() << " buffers (" << handles[q].size()
        << " handle bytes); this rank captured " << n;
  }
  DeviceScope scope(h->device, op);
  for (size_t i = 0; i < n; ++i) {
    std::vector<const void*> ptrs(h->world);
    for (int q = 0; q < h->world; ++q) {
      if (q == h->rank) {
        ptrs[q] = h->pending_graph_inputs[i].first;
        continue;
      }
      std::string key(kHandleBytes, '\0');
      for (size_t b = 0; b < kHandleBytes; ++b) {
        key[b] = static_cast<char>(handles[q][i * kHandleBytes + b] & 0xff);
      }
      auto it = h->opened.find(key);
      if (it == h->opened.end()) {
        cudaIpcMemHandle_t ipc;
        std::memcpy(ipc.reserved, key.data(), kHandleBytes);
        void* base = nullptr;
        FC_CUDA_CHECK(cudaIpcOpenMemHandle(&base, ipc, cudaIpcMemLazyEnablePeerAccess), op);
        it = h->opened.emplace(key, static_cast<char*>(base)).first;
      }
      FC_CHECK_VALUE(offsets[q][i] >= 0, op) << "rank " << q << " sent a negative offset";
      ptrs[q] = it->second + offsets[q][i];
    }
    write_record(h->pending_graph_inputs[i].second, ptrs, h->device, op);
  }
  h->pending_graph_inputs.clear();
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_peer_graph_meta, fusedcomm::allreduce_peer_graph_meta);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_peer_register_graph,
                              fusedcomm::allreduce_peer_register_graph);
