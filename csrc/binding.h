// What every binding shares: typed argument checks, dtype names, device scope, CUDA checks and
// the registry of live handles. Bindings do three things only: validate, pick device and
// stream, build the args and launch.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

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

#define FC_CUDA_CHECK(stmt, op)                                                                \
  do {                                                                                         \
    cudaError_t err_ = (stmt);                                                                 \
    if (err_ != cudaSuccess) {                                                                 \
      TVM_FFI_THROW(RuntimeError) << op << ": " #stmt " failed: " << cudaGetErrorString(err_); \
    }                                                                                          \
  } while (0)

// The two exports of a kernel module, at global scope after its fusedcomm::launch:
//   <name>_launcher() -> the address of `launch` as a `Launcher` (what the control module calls)
//   <name>_abi() -> `abi`, the version of the headers the module was built from
#define FC_EXPORT_KERNEL_MODULE(name, Launcher, abi)                          \
  namespace fusedcomm {                                                       \
  int64_t name##_launcher() {                                                 \
    Launcher fn = &launch;                                                    \
    return reinterpret_cast<int64_t>(fn);                                     \
  }                                                                           \
  int64_t name##_abi() { return abi; }                                        \
  }                                                                           \
  TVM_FFI_DLL_EXPORT_TYPED_FUNC(name##_launcher, fusedcomm::name##_launcher); \
  TVM_FFI_DLL_EXPORT_TYPED_FUNC(name##_abi, fusedcomm::name##_abi)

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
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
  int device_ = 0;
};

// The allocation that contains `ptr`: its base and size (driver cuMemGetAddressRange).
inline void allocation_of(const void* ptr, CUdeviceptr* base, size_t* size, const char* op) {
  static void* fn = nullptr;
  if (fn == nullptr) {
    cudaDriverEntryPointQueryResult found{};
    FC_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000,
                                                   cudaEnableDefault, &found),
                  op);
    FC_CHECK_VALUE(fn != nullptr && found == cudaDriverEntryPointSuccess, op)
        << "the driver has no cuMemGetAddressRange";
  }
  auto get_range = reinterpret_cast<CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr)>(fn);
  CUresult res = get_range(base, size, reinterpret_cast<CUdeviceptr>(ptr));
  FC_CHECK_VALUE(res == CUDA_SUCCESS, op)
      << "cuMemGetAddressRange failed (" << res << ") for pointer " << ptr;
}

// A family's describe(): the facts Python must not re-type. Every family names its op (as users
// call it) and id, its phases and algorithms; `facts` adds its limits and sizes.
inline ffi::Map<ffi::String, ffi::Any> describe_family(
    const char* op, int64_t op_id, ffi::Array<ffi::String> phases,
    std::initializer_list<std::pair<const char*, int64_t>> facts) {
  ffi::Map<ffi::String, ffi::Any> m{
      {"op", ffi::String(op)},
      {"op_id", op_id},
      {"phases", phases},
      {"algorithms", ffi::Array<ffi::String>{"auto", "oneshot", "twoshot"}}};
  for (const auto& fact : facts) m.Set(fact.first, fact.second);
  return m;
}

// Live handles of one family by id. Ids count up from 1 and are never reused, so a stale id
// never names a newer handle. The registry is locked; the handles themselves are not.
template <typename Handle>
class HandleRegistry {
 public:
  int64_t add(Handle* h) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t id = next_++;
    handles_.emplace(id, h);
    return id;
  }

  // The live handle `id`; with `remove`, also take it out of the registry (atomically).
  Handle* get(int64_t id, const char* op, bool remove = false) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = handles_.find(id);
    FC_CHECK_VALUE(it != handles_.end(), op)
        << "handle " << id << " is not live (never created, or already disposed)";
    Handle* h = it->second;
    if (remove) handles_.erase(it);
    return h;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<int64_t, Handle*> handles_;
  int64_t next_ = 1;
};

}  // namespace fusedcomm
