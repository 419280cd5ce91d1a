// allreduce_peer: the vLLM-compatible custom all-reduce (peer-to-peer reads over NVLink / P2P).
// Host code only: the kernels live in the per-configuration modules (allreduce_peer_kernels.cu),
// whose launcher the caller passes with each call.
//
// A handle (an opaque int for Python) owns: the signal headers of all ranks (mapped here by the
// caller), a bump allocator of 64-byte pointer records in `rank_data` device memory, the map
// own-buffer-pointer -> record, inputs captured in CUDA graphs awaiting registration, the IPC
// mappings it opened, and the communicator's failure site.
#include <tvm/ffi/container/map.h>

#include <cmath>
#include <memory>

#include "allreduce_peer_handle.h"
#include "allreduce_peer_plan.h"

namespace fusedcomm {

int64_t allreduce_peer_meta_size() { return sizeof(PeerSignal); }

int64_t allreduce_peer_abi() { return kPeerAbi; }

ffi::Map<ffi::String, ffi::Any> allreduce_peer_describe() {
  return describe_family("vllm_all_reduce", kOpPeerAllReduce, {"start", "middle", "end"},
                         {{"max_blocks", kMaxBlocks},
                          {"max_ranks", kMaxRanks},
                          {"threads", kPeerThreads},
                          {"record_bytes", sizeof(RankPointers)},
                          {"meta_bytes", sizeof(PeerSignal)},
                          {"stage_in_kernel_max_bytes", kStageInKernelMaxBytes}});
}

ffi::Array<int64_t> allreduce_peer_plan(int64_t bytes, int64_t world, int64_t num_ctas,
                                        int64_t algorithm, bool staged, int64_t scratch) {
  const PeerPlan p = plan_peer_all_reduce(bytes, static_cast<int>(world), num_ctas,
                                          static_cast<PeerAlgorithm>(algorithm), staged, scratch);
  return ffi::Array<int64_t>{p.algorithm, static_cast<int64_t>(p.staging), p.blocks,
                             p.scratch_bytes};
}

int64_t allreduce_peer_init(ffi::Array<int64_t> ipc_ptrs, ffi::TensorView rank_data, int64_t rank,
                            bool full_nvlink, int64_t failure_claim, int64_t failure_record,
                            double timeout_s, int64_t meta_bytes) {
  constexpr const char* op = "vllm_init_custom_ar";
  const int64_t world = static_cast<int64_t>(ipc_ptrs.size());
  FC_CHECK_VALUE(world >= 2 && world <= kMaxRanks && world % 2 == 0, op)
      << "world size (" << world << ") must be 2, 4, 6 or 8";
  FC_CHECK_VALUE(rank >= 0 && rank < world, op)
      << "rank (" << rank << ") must be in [0, " << world << ")";
  FC_CHECK_VALUE(full_nvlink || world == 2, op)
      << "full_nvlink=False supports only 2 ranks (got " << world << ")";
  FC_CHECK_VALUE(rank_data.device().device_type == kDLCUDA, op)
      << "rank_data must be a CUDA tensor";
  FC_CHECK_VALUE(rank_data.is_contiguous(), op) << "rank_data must be contiguous";
  FC_CHECK_VALUE(reinterpret_cast<uintptr_t>(data_of(rank_data)) % 64 == 0, op)
      << "rank_data must be 64-byte aligned";
  FC_CHECK_VALUE(std::isfinite(timeout_s) && timeout_s > 0, op)
      << "timeout_s (" << timeout_s << ") must be > 0";
  FC_CHECK_VALUE(failure_claim != 0 && failure_record != 0, op) << "no failure state given";
  for (int64_t q = 0; q < world; ++q) {
    FC_CHECK_VALUE(ipc_ptrs[q] != 0 && ipc_ptrs[q] % 128 == 0, op)
        << "ipc_tensors[" << q << "] (" << ipc_ptrs[q] << ") must be non-null and 128-byte aligned";
  }
  const int device = rank_data.device().device_id;
  DeviceScope scope(device, op);
  // The scratch after our header ends where the meta buffer's allocation ends (or earlier, if
  // the caller says so): two-shot never writes past it.
  CUdeviceptr base = 0;
  size_t size = 0;
  allocation_of(reinterpret_cast<void*>(ipc_ptrs[rank]), &base, &size, op);
  int64_t meta_end = static_cast<int64_t>(base + size) - ipc_ptrs[rank];
  if (meta_bytes > 0) meta_end = meta_bytes < meta_end ? meta_bytes : meta_end;
  FC_CHECK_VALUE(meta_end >= static_cast<int64_t>(sizeof(PeerSignal)), op)
      << "the meta buffer (" << meta_end << " bytes) is smaller than its signal header ("
      << sizeof(PeerSignal) << " bytes, vllm_meta_size())";

  auto h = std::make_unique<PeerHandle>();
  h->rank = static_cast<int>(rank);
  h->world = static_cast<int>(world);
  h->device = device;
  for (int64_t q = 0; q < world; ++q) h->peers[q] = reinterpret_cast<PeerSignal*>(ipc_ptrs[q]);
  h->self = h->peers[rank];
  h->scratch_capacity = meta_end - static_cast<int64_t>(sizeof(PeerSignal));
  h->records = static_cast<RankPointers*>(data_of(rank_data));
  h->capacity = nbytes(rank_data) / static_cast<int64_t>(sizeof(RankPointers));
  h->site.failure.claim = reinterpret_cast<int32_t*>(failure_claim);
  h->site.failure.record = reinterpret_cast<FailureRecord*>(failure_record);
  for (int64_t q = 0; q < world; ++q) h->site.marks[q] = h->peers[q]->abort_mark;
  h->site.timeout_ns = timeout_s >= 1e9 ? uint64_t(1e18) : static_cast<uint64_t>(timeout_s * 1e9);
  h->site.op = kOpPeerAllReduce;
  h->site.rank = static_cast<int32_t>(rank);
  h->site.world = static_cast<int32_t>(world);
  FC_CUDA_CHECK(cudaEventCreateWithFlags(&h->order, cudaEventDisableTiming), op);
  return g_peer_handles.add(h.release());
}

void allreduce_peer_register_buffer(int64_t fa, ffi::Array<int64_t> ptrs) {
  constexpr const char* op = "vllm_register_buffer";
  PeerHandle* h = g_peer_handles.get(fa, op);
  FC_CHECK_VALUE(static_cast<int64_t>(ptrs.size()) == h->world, op)
      << "got " << ptrs.size() << " pointers, expected one per rank (" << h->world << ")";
  std::vector<const void*> mapped;
  for (int64_t p : ptrs) {
    FC_CHECK_VALUE(p != 0 && p % 16 == 0, op)
        << "pointer " << p << " must be non-null and 16-byte aligned";
    mapped.push_back(reinterpret_cast<const void*>(p));
  }
  DeviceScope scope(h->device, op);
  const void* own = mapped[h->rank];
  auto it = h->registered.find(own);
  RankPointers* record = it != h->registered.end() ? it->second : take_record(h, op);
  write_record(record, mapped, h->device, op);
  h->registered[own] = record;
}

// Orders this call after the handle's previous eager call when the stream changed, so two
// streams never run the handle's meetings at once. Inside graph capture the caller orders
// replays (an event recorded outside a capture cannot be waited on inside it).
void order_streams(PeerHandle* h, cudaStream_t stream, bool capturing, const char* op) {
  if (capturing || stream == h->last_stream) return;
  if (h->last_stream != nullptr) {
    FC_CUDA_CHECK(cudaEventRecord(h->order, h->last_stream), op);
    FC_CUDA_CHECK(cudaStreamWaitEvent(stream, h->order, 0), op);
  }
  h->last_stream = stream;
}

void allreduce_peer_all_reduce(int64_t fa, ffi::TensorView inp, ffi::TensorView out,
                               int64_t reg_buffer, int64_t reg_buffer_bytes, int64_t num_ctas,
                               int64_t algorithm, int64_t launcher) {
  constexpr const char* op = "vllm_all_reduce";
  PeerHandle* h = g_peer_handles.get(fa, op);
  FC_CHECK_VALUE(inp.device().device_type == kDLCUDA && inp.device().device_id == h->device, op)
      << "inp must be on cuda:" << h->device;
  FC_CHECK_VALUE(out.device().device_type == kDLCUDA && out.device().device_id == h->device, op)
      << "out must be on cuda:" << h->device;
  const DType dt = dtype_of(inp.dtype());
  FC_CHECK_TYPE(dt != DType::kOther, op)
      << "dtype " << dtype_name(inp.dtype()) << " is not supported (float32, float16, bfloat16)";
  FC_CHECK_TYPE(dtype_of(out.dtype()) == dt, op)
      << "out dtype " << dtype_name(out.dtype()) << " differs from inp dtype "
      << dtype_name(inp.dtype());
  FC_CHECK_VALUE(inp.numel() == out.numel(), op)
      << "inp has " << inp.numel() << " elements but out has " << out.numel();
  FC_CHECK_VALUE(inp.is_contiguous() && out.is_contiguous(), op)
      << "inp and out must be contiguous";
  const int64_t bytes = nbytes(inp);
  FC_CHECK_VALUE(bytes > 0 && bytes % 16 == 0, op)
      << "message size (" << bytes << " bytes) must be a positive multiple of 16 bytes";
  void* in_ptr = data_of(inp);
  void* out_ptr = data_of(out);
  FC_CHECK_VALUE(reinterpret_cast<uintptr_t>(in_ptr) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(out_ptr) % 16 == 0,
                 op)
      << "inp and out must be 16-byte aligned";
  FC_CHECK_VALUE(num_ctas >= 1 && num_ctas <= kMaxBlocks, op)
      << "num_ctas (" << num_ctas << ") must be in [1, " << kMaxBlocks << "]";
  FC_CHECK_VALUE(algorithm >= kPeerAuto && algorithm <= kPeerTwoshot, op)
      << "algorithm (" << algorithm << ") must be 0 (auto), 1 (one-shot) or 2 (two-shot)";
  FC_CHECK_VALUE(launcher != 0, op) << "no kernel launcher given";
  FC_CHECK_VALUE(in_ptr == out_ptr || !overlaps(in_ptr, out_ptr, bytes), op)
      << "inp and out overlap partially; pass the same tensor or disjoint ones";

  const void* reg = reinterpret_cast<const void*>(reg_buffer);
  const bool staged = reg_buffer != 0 && in_ptr != reg;
  const PeerPlan plan =
      plan_peer_all_reduce(bytes, h->world, num_ctas, static_cast<PeerAlgorithm>(algorithm), staged,
                           h->scratch_capacity);
  FC_CHECK_VALUE(plan.scratch_bytes <= h->scratch_capacity, op)
      << "two-shot needs " << plan.scratch_bytes << " bytes of scratch after the signal header "
      << "but the meta buffer has " << h->scratch_capacity << "; use one-shot or a larger meta "
      << "buffer";

  DeviceScope scope(h->device, op);
  cudaStream_t stream = stream_for(h->device);
  AllReduceArgs a{};
  bool capturing = false;
  if (reg_buffer != 0) {
    FC_CHECK_VALUE(bytes <= reg_buffer_bytes, op)
        << "inp (" << bytes << " bytes) is larger than "
        << "reg_buffer (" << reg_buffer_bytes << " bytes)";
    auto it = h->registered.find(reg);
    FC_CHECK_VALUE(it != h->registered.end(), op)
        << "reg_buffer (" << reg_buffer << ") is not registered; call vllm_register_buffer first";
    FC_CHECK_VALUE(!overlaps(out_ptr, reg, bytes), op) << "out must not overlap reg_buffer";
    FC_CHECK_VALUE(in_ptr == reg || !overlaps(in_ptr, reg, bytes), op)
        << "inp overlaps reg_buffer without starting at it";
    a.inputs = it->second;
  } else {
    // peers read inp in place, so out must not overlap it
    FC_CHECK_VALUE(!overlaps(in_ptr, out_ptr, bytes), op)
        << "out must not overlap inp when inp is read in place (registered or captured)";
    auto it = h->registered.find(in_ptr);
    if (it != h->registered.end()) {
      a.inputs = it->second;
    } else {
      cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
      FC_CUDA_CHECK(cudaStreamIsCapturing(stream, &status), op);
      FC_CHECK_VALUE(status == cudaStreamCaptureStatusActive, op)
          << "inp is not a registered buffer and no reg_buffer was given (outside graph capture)";
      capturing = true;
      RankPointers* record = take_record(h, op);
      h->pending_graph_inputs.emplace_back(in_ptr, record);
      a.inputs = record;
    }
  }
  if (stream != h->last_stream && !capturing) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    FC_CUDA_CHECK(cudaStreamIsCapturing(stream, &status), op);
    capturing = status == cudaStreamCaptureStatusActive;
  }
  order_streams(h, stream, capturing, op);
  if (plan.staging == PeerStaging::kInKernel) a.stage_from = in_ptr;
  if (plan.staging == PeerStaging::kCopy) {
    FC_CUDA_CHECK(
        cudaMemcpyAsync(const_cast<void*>(reg), in_ptr, bytes, cudaMemcpyDeviceToDevice, stream),
        op);
  }
  a.out = out_ptr;
  a.self = h->self;
  for (int q = 0; q < h->world; ++q) a.peers[q] = h->peers[q];
  a.num_packs = bytes / 16;
  a.site = h->site;
  FC_CUDA_CHECK(reinterpret_cast<PeerLauncher>(launcher)(a, plan.algorithm, plan.blocks, stream),
                op);
}

void allreduce_peer_dispose(int64_t fa) {
  constexpr const char* op = "vllm_dispose";
  std::unique_ptr<PeerHandle> h(g_peer_handles.get(fa, op, /*remove=*/true));
  DeviceScope scope(h->device, op);
  // Kernels still queued may read through the mappings: let them finish first.
  FC_CUDA_CHECK(cudaDeviceSynchronize(), op);
  for (auto& entry : h->opened) cudaIpcCloseMemHandle(entry.second);
  cudaEventDestroy(h->order);
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_peer_meta_size, fusedcomm::allreduce_peer_meta_size);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_peer_abi, fusedcomm::allreduce_peer_abi);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_peer_describe, fusedcomm::allreduce_peer_describe);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_peer_plan, fusedcomm::allreduce_peer_plan);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_peer_init, fusedcomm::allreduce_peer_init);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_peer_register_buffer,
                              fusedcomm::allreduce_peer_register_buffer);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_peer_all_reduce, fusedcomm::allreduce_peer_all_reduce);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_peer_dispose, fusedcomm::allreduce_peer_dispose);
