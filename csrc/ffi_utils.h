// Helpers shared by the bindings: typed argument checks, dtype names, CUDA error checks.
// Bindings do three things only: validate, pick device and stream, build the args and launch.
#pragma once
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <string>

namespace fusedcomm {

namespace ffi = tvm::ffi;

// Raise ValueError / TypeError with "<op>: <message>" unless `cond` holds.
// (The if/else form keeps a following `else` from binding to the check.)
#define FC_CHECK_VALUE(cond, op) \
  if (cond) {                    \
  } else                         \
    TVM_FFI_THROW(ValueError) << op << ": "
#define FC_CHECK_TYPE(cond, op) \
  if (cond) {                   \
  } else                        \
    TVM_FFI_THROW(TypeError) << op << ": "

#define FC_CUDA_CHECK(stmt, op)                                                        \
  do {                                                                                 \
    cudaError_t err_ = (stmt);                                                         \
    if (err_ != cudaSuccess) {                                                         \
      TVM_FFI_THROW(RuntimeError) << op << ": " #stmt " failed: " << cudaGetErrorString(err_); \
    }                                                                                  \
  } while (0)

enum class DType { kF32, kF16, kBF16, kOther };

inline DType dtype_of(DLDataType t) {
  if (t.code == kDLFloat && t.bits == 32 && t.lanes == 1) return DType::kF32;
  if (t.code == kDLFloat && t.bits == 16 && t.lanes == 1) return DType::kF16;
  if (t.code == kDLBfloat && t.bits == 16 && t.lanes == 1) return DType::kBF16;
  return DType::kOther;
}

inline std::string dtype_name(DLDataType t) {
  switch (dtype_of(t)) {
    case DType::kF32: return "float32";
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
    default: return "code " + std::to_string(t.code) + " bits " + std::to_string(t.bits);
  }
}

inline int64_t nbytes(const ffi::TensorView& t) {
  int64_t n = (t.dtype().bits * t.dtype().lanes + 7) / 8;
  for (int i = 0; i < t.ndim(); ++i) n *= t.shape()[i];
  return n;
}

inline void* data_of(const ffi::TensorView& t) {
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

// True when [a, a + n) and [b, b + n) share a byte.
inline bool overlaps(const void* a, const void* b, int64_t n) {
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x < y + static_cast<uintptr_t>(n) && y < x + static_cast<uintptr_t>(n);
}

inline cudaStream_t stream_for(int device) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
}

}  // namespace fusedcomm
