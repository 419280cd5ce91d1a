// vllm_ar: the vLLM-compatible custom all-reduce (peer-to-peer reads over NVLink / PCIe P2P).
//
// A handle (an opaque int for Python) owns: the signal headers of all ranks (mapped here by the
// caller), a bump allocator of 64-byte pointer records in `rank_data` device memory, the map
// own-buffer-pointer -> record, inputs captured in CUDA graphs awaiting registration, and the
// IPC mappings it opened. Bindings validate, pick device and stream, then launch.
#include <cmath>
#include <memory>

#include "vllm_handle.h"

namespace fusedcomm {

// Messages up to this size are staged into the registered buffer by the all-reduce kernel
// itself; larger ones by a separate device-to-device copy (FC_STAGE_IN_KERNEL_MAX: tuning).
#ifndef FC_STAGE_IN_KERNEL_MAX
#define FC_STAGE_IN_KERNEL_MAX (4 << 20)
#endif
constexpr int64_t kStageInKernelMaxBytes = FC_STAGE_IN_KERNEL_MAX;

int64_t vllm_meta_size() { return sizeof(PeerSignal); }

int64_t vllm_init_custom_ar(ffi::Array<int64_t> ipc_ptrs, ffi::TensorView rank_data, int64_t rank,
                            bool full_nvlink, int64_t failure_claim, int64_t failure_record,
                            double timeout_s) {
  constexpr const char* op = "vllm_init_custom_ar";
  const int64_t world = static_cast<int64_t>(ipc_ptrs.size());
  FC_CHECK_VALUE(world >= 2 && world <= kMaxRanks && world % 2 == 0, op)
      << "world size (" << world << ") must be 2, 4, 6 or 8";
  FC_CHECK_VALUE(rank >= 0 && rank < world, op)
      << "rank (" << rank << ") must be in [0, " << world << ")";
  FC_CHECK_VALUE(full_nvlink || world == 2, op)
      << "full_nvlink=False supports only 2 ranks (got " << world << ")";
  FC_CHECK_VALUE(rank_data.device().device_type == kDLCUDA, op) << "rank_data must be a CUDA tensor";
  FC_CHECK_VALUE(rank_data.is_contiguous(), op) << "rank_data must be contiguous";
  FC_CHECK_VALUE(reinterpret_cast<uintptr_t>(data_of(rank_data)) % 64 == 0, op)
      << "rank_data must be 64-byte aligned";
  FC_CHECK_VALUE(std::isfinite(timeout_s) && timeout_s > 0, op)
      << "timeout_s (" << timeout_s << ") must be > 0";
  for (int64_t q = 0; q < world; ++q) {
    FC_CHECK_VALUE(ipc_ptrs[q] != 0 && ipc_ptrs[q] % 16 == 0, op)
        << "ipc_tensors[" << q << "] (" << ipc_ptrs[q] << ") must be non-null and 16-byte aligned";
  }
  auto* h = new VllmHandle();
  h->rank = static_cast<int>(rank);
  h->world = static_cast<int>(world);
  h->device = rank_data.device().device_id;
  h->full_nvlink = full_nvlink;
  for (int64_t q = 0; q < world; ++q) h->peers[q] = reinterpret_cast<PeerSignal*>(ipc_ptrs[q]);
  h->self = h->peers[rank];
  h->records = static_cast<RankPointers*>(data_of(rank_data));
  h->capacity = nbytes(rank_data) / static_cast<int64_t>(sizeof(RankPointers));
  h->failure.claim = reinterpret_cast<int32_t*>(failure_claim);
  h->failure.record = reinterpret_cast<FailureRecord*>(failure_record);
  h->timeout_ns = timeout_s >= 1e9 ? uint64_t(1e18) : static_cast<uint64_t>(timeout_s * 1e9);
  return add_handle(h);
}

void vllm_register_buffer(int64_t fa, ffi::Array<int64_t> ptrs) {
  constexpr const char* op = "vllm_register_buffer";
  VllmHandle* h = handle_of(fa, op);
  FC_CHECK_VALUE(static_cast<int64_t>(ptrs.size()) == h->world, op)
      << "got " << ptrs.size() << " pointers, expected one per rank (" << h->world << ")";
  std::vector<const void*> mapped;
  for (int64_t p : ptrs) {
    FC_CHECK_VALUE(p != 0 && p % 16 == 0, op) << "pointer " << p << " must be non-null and 16-byte aligned";
    mapped.push_back(reinterpret_cast<const void*>(p));
  }
  DeviceScope scope(h->device, op);
  const void* own = mapped[h->rank];
  auto it = h->registered.find(own);
  RankPointers* record = it != h->registered.end() ? it->second : take_record(h, op);
  write_record(record, mapped, h->device, op);
  h->registered[own] = record;
}

void vllm_all_reduce(int64_t fa, ffi::TensorView inp, ffi::TensorView out, int64_t reg_buffer,
                     int64_t reg_buffer_bytes, int64_t num_ctas, int64_t algorithm) {
  constexpr const char* op = "vllm_all_reduce";
  VllmHandle* h = handle_of(fa, op);
  FC_CHECK_VALUE(inp.device().device_type == kDLCUDA && inp.device().device_id == h->device, op)
      << "inp must be on cuda:" << h->device;
  FC_CHECK_VALUE(out.device().device_type == kDLCUDA && out.device().device_id == h->device, op)
      << "out must be on cuda:" << h->device;
  const DType dt = dtype_of(inp.dtype());
  FC_CHECK_TYPE(dt != DType::kOther, op) << "dtype " << dtype_name(inp.dtype())
                                         << " is not supported (float32, float16, bfloat16)";
  FC_CHECK_TYPE(dtype_of(out.dtype()) == dt, op) << "out dtype " << dtype_name(out.dtype())
                                                 << " differs from inp dtype " << dtype_name(inp.dtype());
  FC_CHECK_VALUE(inp.numel() == out.numel(), op)
      << "inp has " << inp.numel() << " elements but out has " << out.numel();
  FC_CHECK_VALUE(inp.is_contiguous() && out.is_contiguous(), op) << "inp and out must be contiguous";
  const int64_t bytes = nbytes(inp);
  FC_CHECK_VALUE(bytes > 0 && bytes % 16 == 0, op)
      << "message size (" << bytes << " bytes) must be a positive multiple of 16 bytes";
  void* in_ptr = data_of(inp);
  void* out_ptr = data_of(out);
  FC_CHECK_VALUE(reinterpret_cast<uintptr_t>(in_ptr) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(out_ptr) % 16 == 0, op)
      << "inp and out must be 16-byte aligned";
  FC_CHECK_VALUE(num_ctas >= 1 && num_ctas <= kMaxBlocks, op)
      << "num_ctas (" << num_ctas << ") must be in [1, " << kMaxBlocks << "]";
  FC_CHECK_VALUE(algorithm >= 0 && algorithm <= 2, op)
      << "algorithm (" << algorithm << ") must be 0 (auto), 1 (one-shot) or 2 (two-shot)";

  DeviceScope scope(h->device, op);
  cudaStream_t stream = stream_for(h->device);
  AllReduceArgs a{};
  const void* reg = reinterpret_cast<const void*>(reg_buffer);
  if (reg_buffer != 0) {
    FC_CHECK_VALUE(bytes <= reg_buffer_bytes, op) << "inp (" << bytes << " bytes) is larger than "
                                                  << "reg_buffer (" << reg_buffer_bytes << " bytes)";
    auto it = h->registered.find(reg);
    FC_CHECK_VALUE(it != h->registered.end(), op)
        << "reg_buffer (" << reg_buffer << ") is not registered; call vllm_register_buffer first";
    FC_CHECK_VALUE(!overlaps(out_ptr, reg, bytes), op) << "out must not overlap reg_buffer";
    FC_CHECK_VALUE(in_ptr == reg || !overlaps(in_ptr, reg, bytes), op)
        << "inp overlaps reg_buffer without starting at it";
    a.inputs = it->second;
    if (in_ptr == reg) {
      // already in the registered buffer: read in place
    } else if (bytes <= kStageInKernelMaxBytes) {
      a.stage_from = in_ptr;  // the kernel copies, one launch in all
    } else {                  // large: a full-GPU copy first is faster than 36 blocks copying
      void* own = const_cast<void*>(reinterpret_cast<const void*>(reg_buffer));
      FC_CUDA_CHECK(cudaMemcpyAsync(own, in_ptr, bytes, cudaMemcpyDeviceToDevice, stream), op);
    }
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
      RankPointers* record = take_record(h, op);
      h->pending_graph_inputs.emplace_back(in_ptr, record);
      a.inputs = record;
    }
  }
  a.out = out_ptr;
  a.self = h->self;
  for (int q = 0; q < h->world; ++q) a.peers[q] = h->peers[q];
  a.num_packs = bytes / 16;
  a.rank = h->rank;
  a.world = h->world;
  a.site = WaitSite{h->failure, h->timeout_ns, kOpVllmAllReduce, h->rank, h->world};

  bool twoshot = algorithm == 2;
  if (algorithm == 0 && h->world > 2) {
    twoshot = !((h->world <= 4 && bytes < 512 * 1024) || (h->world <= 8 && bytes < 256 * 1024));
  }
  const int64_t wanted = (a.num_packs + kAllReduceThreads - 1) / kAllReduceThreads;
  const int blocks = static_cast<int>(wanted < num_ctas ? wanted : num_ctas);
  cudaError_t err = dt == DType::kF32   ? launch_allreduce_f32(a, twoshot, blocks, stream)
                    : dt == DType::kF16 ? launch_allreduce_f16(a, twoshot, blocks, stream)
                                        : launch_allreduce_bf16(a, twoshot, blocks, stream);
  FC_CUDA_CHECK(err, op);
}

void vllm_dispose(int64_t fa) {
  constexpr const char* op = "vllm_dispose";
  VllmHandle* h = handle_of(fa, op, /*remove=*/true);
  std::unique_ptr<VllmHandle> owned(h);
  DeviceScope scope(h->device, op);
  // Kernels still queued may read through the mappings: let them finish first.
  FC_CUDA_CHECK(cudaDeviceSynchronize(), op);
  for (auto& entry : h->opened) cudaIpcCloseMemHandle(entry.second);
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(vllm_meta_size, fusedcomm::vllm_meta_size);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(vllm_init_custom_ar, fusedcomm::vllm_init_custom_ar);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(vllm_register_buffer, fusedcomm::vllm_register_buffer);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(vllm_all_reduce, fusedcomm::vllm_all_reduce);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(vllm_dispose, fusedcomm::vllm_dispose);
