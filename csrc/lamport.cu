// lamport: fill Lamport buffers with the empty sentinel (negative zero).
//   lamport_initialize(ptr, num_bytes, elem_bytes, device, stream): fills exactly num_bytes on
//   `stream` (a cudaStream_t of `device`; 0 = the legacy default stream).
#include "binding.h"
#include "fusedcomm/kernels/lamport_fill.cuh"

namespace fusedcomm {

void lamport_initialize(int64_t ptr, int64_t num_bytes, int64_t elem_bytes, int64_t device,
                        int64_t stream) {
  constexpr const char* op = "lamport_initialize";
  FC_CHECK_VALUE(ptr != 0, op) << "buffer pointer is null";
  FC_CHECK_VALUE(ptr % 16 == 0, op) << "buffer pointer (" << ptr << ") must be 16-byte aligned";
  FC_CHECK_VALUE(elem_bytes == 2 || elem_bytes == 4, op)
      << "element size (" << elem_bytes << ") must be 2 or 4 bytes";
  FC_CHECK_VALUE(num_bytes >= 0 && num_bytes % elem_bytes == 0, op)
      << "size (" << num_bytes << " bytes) must be >= 0 and a multiple of " << elem_bytes;
  if (num_bytes == 0) return;
  const int threads = 256;
  const int64_t wanted = (num_bytes / 16 + threads) / threads;
  const int blocks = static_cast<int>(wanted < 1024 ? wanted : 1024);
  DeviceScope scope(static_cast<int>(device), op);
  lamport_fill<<<blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<void*>(ptr), num_bytes, static_cast<int>(elem_bytes));
  FC_CUDA_CHECK(cudaGetLastError(), op);
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(lamport_initialize, fusedcomm::lamport_initialize);
