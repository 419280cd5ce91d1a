// runtime: process-wide helpers every family needs.
//   failure_state_create(device) -> (claim device ptr, record host ptr, record device ptr)
//   failure_state_destroy(claim, record_host)
//   failure_record_size() -> bytes of FailureRecord (the host reads it with this size)
#include "ffi_utils.h"
#include <cstring>

#include "fusedcomm/common/status.cuh"

namespace fusedcomm {

ffi::Array<int64_t> failure_state_create(int64_t device) {
  constexpr const char* op = "failure_state_create";
  FC_CHECK_VALUE(device >= 0, op) << "device (" << device << ") must be >= 0";
  int previous = 0;
  FC_CUDA_CHECK(cudaGetDevice(&previous), op);
  FC_CUDA_CHECK(cudaSetDevice(static_cast<int>(device)), op);
  int32_t* claim = nullptr;
  void* host = nullptr;
  void* mapped = nullptr;
  FC_CUDA_CHECK(cudaMalloc(&claim, sizeof(int32_t)), op);
  FC_CUDA_CHECK(cudaMemset(claim, 0, sizeof(int32_t)), op);
  FC_CUDA_CHECK(cudaHostAlloc(&host, sizeof(FailureRecord), cudaHostAllocMapped | cudaHostAllocPortable), op);
  std::memset(host, 0, sizeof(FailureRecord));
  FC_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, host, 0), op);
  FC_CUDA_CHECK(cudaDeviceSynchronize(), op);
  FC_CUDA_CHECK(cudaSetDevice(previous), op);
  return ffi::Array<int64_t>{reinterpret_cast<int64_t>(claim), reinterpret_cast<int64_t>(host),
                             reinterpret_cast<int64_t>(mapped)};
}

// Clears a failure after the host has raised it. Only call when no kernel is still waiting.
void failure_state_reset(int64_t device, int64_t claim, int64_t record_host) {
  constexpr const char* op = "failure_state_reset";
  int previous = 0;
  FC_CUDA_CHECK(cudaGetDevice(&previous), op);
  FC_CUDA_CHECK(cudaSetDevice(static_cast<int>(device)), op);
  FC_CUDA_CHECK(cudaDeviceSynchronize(), op);
  std::memset(reinterpret_cast<void*>(record_host), 0, sizeof(FailureRecord));
  FC_CUDA_CHECK(cudaMemset(reinterpret_cast<void*>(claim), 0, sizeof(int32_t)), op);
  FC_CUDA_CHECK(cudaDeviceSynchronize(), op);
  FC_CUDA_CHECK(cudaSetDevice(previous), op);
}

int64_t failure_record_size() { return sizeof(FailureRecord); }

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(failure_state_create, fusedcomm::failure_state_create);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(failure_state_reset, fusedcomm::failure_state_reset);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(failure_record_size, fusedcomm::failure_record_size);
