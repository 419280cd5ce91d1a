// lamport: fill Lamport buffers with the empty sentinel (negative zero).
//   lamport_initialize(ptr, num_bytes, elem_bytes, device, stream): fills ceil(num_bytes / 16)
//   chunks on `stream` (a cudaStream_t of `device`; 0 = the legacy default stream).
#include "ffi_utils.h"
#include "fusedcomm/kernels/lamport_fill.cuh"

namespace fusedcomm {

void lamport_initialize(int64_t ptr, int64_t num_bytes, int64_t elem_bytes, int64_t device,
                        int64_t stream) {
  constexpr const char* op = "lamport_initialize";
  FC_CHECK_VALUE(ptr != 0, op) << "buffer pointer is null";
  FC_CHECK_VALUE(ptr % 16 == 0, op) << "buffer pointer (" << ptr << ") must be 16-byte aligned";
  FC_CHECK_VALUE(num_bytes >= 0, op) << "size (" << num_bytes << " bytes) must be >= 0";
  FC_CHECK_VALUE(elem_bytes == 2 || elem_bytes == 4, op)
      << "element size (" << elem_bytes << ") must be 2 or 4 bytes";
  if (num_bytes == 0) return;
  const int64_t chunks = (num_bytes + 15) / 16;
  const int threads = 256;
  const int64_t wanted = (chunks + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 1024 ? wanted : 1024);
  int previous = 0;
  FC_CUDA_CHECK(cudaGetDevice(&previous), op);
  if (previous != device) FC_CUDA_CHECK(cudaSetDevice(static_cast<int>(device)), op);
  lamport_fill<<<blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<uint4*>(ptr), chunks, lamport_empty_word(static_cast<int>(elem_bytes)));
  cudaError_t err = cudaGetLastError();
  if (previous != device) cudaSetDevice(previous);
  FC_CUDA_CHECK(err, op);
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(lamport_initialize, fusedcomm::lamport_initialize);
