// runtime: host-only helpers every family needs (no device code; one build for all archs).
//   failure_state_create(device) -> [claim device ptr, record host ptr, record device ptr]
//   failure_state_destroy(device, claim, record_host)   after the device is done with them
//   failure_record_fields() -> [[name, byte offset, byte size], ...] (the host reads with these)
//   failure_code_names() -> [name of code 0, 1, ...]
#include <cstddef>
#include <cstring>

#include "binding.h"
#include "fusedcomm/common/failure.cuh"

namespace fusedcomm {

ffi::Array<int64_t> failure_state_create(int64_t device) {
  constexpr const char* op = "failure_state_create";
  FC_CHECK_VALUE(device >= 0, op) << "device (" << device << ") must be >= 0";
  DeviceScope scope(static_cast<int>(device), op);
  int32_t* claim = nullptr;
  void* host = nullptr;
  void* mapped = nullptr;
  FC_CUDA_CHECK(cudaMalloc(&claim, sizeof(int32_t)), op);
  cudaError_t err = cudaMemset(claim, 0, sizeof(int32_t));
  if (err == cudaSuccess) {
    err = cudaHostAlloc(&host, sizeof(FailureRecord), cudaHostAllocMapped | cudaHostAllocPortable);
  }
  if (err == cudaSuccess) {
    std::memset(host, 0, sizeof(FailureRecord));
    err = cudaHostGetDevicePointer(&mapped, host, 0);
  }
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {  // leave nothing allocated
    cudaFree(claim);
    if (host != nullptr) cudaFreeHost(host);
    FC_CUDA_CHECK(err, op);
  }
  return ffi::Array<int64_t>{reinterpret_cast<int64_t>(claim), reinterpret_cast<int64_t>(host),
                             reinterpret_cast<int64_t>(mapped)};
}

void failure_state_destroy(int64_t device, int64_t claim, int64_t record_host) {
  constexpr const char* op = "failure_state_destroy";
  DeviceScope scope(static_cast<int>(device), op);
  FC_CUDA_CHECK(cudaDeviceSynchronize(), op);  // no kernel may still write the record
  FC_CUDA_CHECK(cudaFree(reinterpret_cast<void*>(claim)), op);
  FC_CUDA_CHECK(cudaFreeHost(reinterpret_cast<void*>(record_host)), op);
}

ffi::Array<ffi::Array<ffi::Any>> failure_record_fields() {
  ffi::Array<ffi::Array<ffi::Any>> fields;
  auto add = [&](const char* name, size_t offset, size_t size) {
    fields.push_back(ffi::Array<ffi::Any>{ffi::String(name), static_cast<int64_t>(offset),
                                          static_cast<int64_t>(size)});
  };
#define FC_FIELD(f) add(#f, offsetof(FailureRecord, f), sizeof(FailureRecord::f))
  FC_FIELD(code);
  FC_FIELD(op);
  FC_FIELD(rank);
  FC_FIELD(peer);
  FC_FIELD(phase);
  FC_FIELD(block);
  FC_FIELD(expected);
  FC_FIELD(observed);
  FC_FIELD(waited_ns);
  FC_FIELD(timeout_ns);
  FC_FIELD(world);
#undef FC_FIELD
  add("size", 0, sizeof(FailureRecord));
  return fields;
}

ffi::Array<ffi::String> failure_code_names() {
  return ffi::Array<ffi::String>{"none", "timeout", "peer_aborted", "mismatch"};
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(failure_state_create, fusedcomm::failure_state_create);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(failure_state_destroy, fusedcomm::failure_state_destroy);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(failure_record_fields, fusedcomm::failure_record_fields);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(failure_code_names, fusedcomm::failure_code_names);
