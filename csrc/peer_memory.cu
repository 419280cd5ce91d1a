// peer_memory: device memory that every rank of a node maps at one fixed row stride, through the
// driver's virtual memory management (VMM) with POSIX file-descriptor handles. Host code only.
//   peer_memory_granularity(device) -> bytes (sizes and row strides are multiples of it)
//   peer_memory_create(device, size) -> [handle, fd]   the caller sends fd to its peers
//   peer_memory_import(fd) -> handle                   the caller still owns (and closes) fd
//   peer_memory_release(handles)                       for handles that were never mapped
//   peer_memory_map(device, handles, stride) -> base   row q at base + q * stride; consumes handles
//   peer_memory_unmap(device, base, stride, world)     after the device is done with the rows
// Unicast only: no multicast object and no fabric handle is ever created here.
#include <cuda.h>

#include <cstdint>
#include <string>

#include "binding.h"

namespace fusedcomm {
namespace {

constexpr CUmemAllocationHandleType kFdHandle = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;

// The driver's function `name`, found through the runtime (fusedcomm never links libcuda).
void* driver_entry(const char* name, const char* op) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  FC_CUDA_CHECK(cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &found), op);
  FC_CHECK_VALUE(fn != nullptr && found == cudaDriverEntryPointSuccess, op)
      << "the driver has no " << name;
  return fn;
}

// The driver functions used here, looked up once per process.
struct Driver {
#define FC_DRIVER_FN(name) decltype(&::name) name;
  FC_DRIVER_FN(cuGetErrorName)
  FC_DRIVER_FN(cuDeviceGet)
  FC_DRIVER_FN(cuDeviceGetAttribute)
  FC_DRIVER_FN(cuMemGetAllocationGranularity)
  FC_DRIVER_FN(cuMemCreate)
  FC_DRIVER_FN(cuMemRelease)
  FC_DRIVER_FN(cuMemExportToShareableHandle)
  FC_DRIVER_FN(cuMemImportFromShareableHandle)
  FC_DRIVER_FN(cuMemAddressReserve)
  FC_DRIVER_FN(cuMemAddressFree)
  FC_DRIVER_FN(cuMemMap)
  FC_DRIVER_FN(cuMemUnmap)
  FC_DRIVER_FN(cuMemSetAccess)
#undef FC_DRIVER_FN
};

const Driver& driver(const char* op) {
  static const Driver d = [op] {
    Driver x{};
#define FC_LOAD(name) x.name = reinterpret_cast<decltype(x.name)>(driver_entry(#name, op));
    FC_LOAD(cuGetErrorName)
    FC_LOAD(cuDeviceGet)
    FC_LOAD(cuDeviceGetAttribute)
    FC_LOAD(cuMemGetAllocationGranularity)
    FC_LOAD(cuMemCreate)
    FC_LOAD(cuMemRelease)
    FC_LOAD(cuMemExportToShareableHandle)
    FC_LOAD(cuMemImportFromShareableHandle)
    FC_LOAD(cuMemAddressReserve)
    FC_LOAD(cuMemAddressFree)
    FC_LOAD(cuMemMap)
    FC_LOAD(cuMemUnmap)
    FC_LOAD(cuMemSetAccess)
#undef FC_LOAD
    return x;
  }();
  return d;
}

const char* result_name(CUresult res) {
  const char* name = nullptr;
  if (driver("peer_memory").cuGetErrorName(res, &name) != CUDA_SUCCESS || name == nullptr) {
    return "unknown CUresult";
  }
  return name;
}

#define FC_CU_CHECK(stmt, op)                                                                  \
  do {                                                                                         \
    CUresult res_ = (stmt);                                                                    \
    if (res_ != CUDA_SUCCESS) {                                                                \
      TVM_FFI_THROW(RuntimeError) << op << ": " #stmt " failed: " << result_name(res_) << " (" \
                                  << static_cast<int>(res_) << ")";                            \
    }                                                                                          \
  } while (0)

// Makes the current device's primary context current (the caller selected `device`) and checks that
// it supports VMM with POSIX file-descriptor handles.
void check_device(int64_t device, const char* op) {
  FC_CUDA_CHECK(cudaFree(nullptr), op);  // the primary context exists and is current
  const Driver& d = driver(op);
  CUdevice dev = 0;
  FC_CU_CHECK(d.cuDeviceGet(&dev, static_cast<int>(device)), op);
  int vmm = 0, fd = 0;
  FC_CU_CHECK(
      d.cuDeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev),
      op);
  FC_CHECK_VALUE(vmm != 0, op) << "device " << device
                               << " does not support virtual memory management (cuMemCreate)";
  FC_CU_CHECK(d.cuDeviceGetAttribute(
                  &fd, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, dev),
              op);
  FC_CHECK_VALUE(fd != 0, op) << "device " << device
                              << " cannot export memory as POSIX file descriptors";
}

CUmemAllocationProp pinned_on(int64_t device) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.requestedHandleTypes = kFdHandle;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = static_cast<int>(device);
  return prop;
}

size_t granularity_of(int64_t device, const char* op) {
  CUmemAllocationProp prop = pinned_on(device);
  size_t gran = 0;
  FC_CU_CHECK(
      driver(op).cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
      op);
  FC_CHECK_VALUE(gran > 0, op) << "the driver reported a granularity of 0";
  return gran;
}

// Undoes rows [0, mapped) of a mapping and frees the range; errors are ignored (cleanup path).
void unmap_quietly(const Driver& d, CUdeviceptr base, size_t stride, size_t mapped, size_t world) {
  for (size_t q = 0; q < mapped; ++q) d.cuMemUnmap(base + q * stride, stride);
  d.cuMemAddressFree(base, world * stride);
}

}  // namespace

int64_t peer_memory_granularity(int64_t device) {
  constexpr const char* op = "peer_memory_granularity";
  FC_CHECK_VALUE(device >= 0, op) << "device (" << device << ") must be >= 0";
  DeviceScope scope(static_cast<int>(device), op);
  check_device(device, op);
  return static_cast<int64_t>(granularity_of(device, op));
}

ffi::Array<int64_t> peer_memory_create(int64_t device, int64_t size) {
  constexpr const char* op = "peer_memory_create";
  FC_CHECK_VALUE(device >= 0, op) << "device (" << device << ") must be >= 0";
  FC_CHECK_VALUE(size > 0, op) << "size (" << size << ") must be > 0";
  DeviceScope scope(static_cast<int>(device), op);
  check_device(device, op);
  const size_t gran = granularity_of(device, op);
  FC_CHECK_VALUE(static_cast<size_t>(size) % gran == 0, op)
      << "size (" << size << ") must be a multiple of the granularity " << gran;
  const Driver& d = driver(op);
  CUmemAllocationProp prop = pinned_on(device);
  CUmemGenericAllocationHandle handle = 0;
  FC_CU_CHECK(d.cuMemCreate(&handle, static_cast<size_t>(size), &prop, 0), op);
  int fd = -1;
  CUresult res = d.cuMemExportToShareableHandle(&fd, handle, kFdHandle, 0);
  if (res != CUDA_SUCCESS) {
    d.cuMemRelease(handle);
    FC_CU_CHECK(res, op);
  }
  return ffi::Array<int64_t>{static_cast<int64_t>(handle), static_cast<int64_t>(fd)};
}

int64_t peer_memory_import(int64_t fd) {
  constexpr const char* op = "peer_memory_import";
  FC_CHECK_VALUE(fd >= 0, op) << "fd (" << fd << ") must be >= 0";
  FC_CUDA_CHECK(cudaFree(nullptr), op);  // the current device's context exists and is current
  CUmemGenericAllocationHandle handle = 0;
  void* os_handle = reinterpret_cast<void*>(static_cast<uintptr_t>(fd));
  FC_CU_CHECK(driver(op).cuMemImportFromShareableHandle(&handle, os_handle, kFdHandle), op);
  return static_cast<int64_t>(handle);
}

void peer_memory_release(ffi::Array<int64_t> handles) {
  constexpr const char* op = "peer_memory_release";
  const Driver& d = driver(op);
  CUresult first = CUDA_SUCCESS;
  for (int64_t h : handles) {  // release them all, then report the first failure
    CUresult res = d.cuMemRelease(static_cast<CUmemGenericAllocationHandle>(h));
    if (first == CUDA_SUCCESS) first = res;
  }
  FC_CU_CHECK(first, op);
}

int64_t peer_memory_map(int64_t device, ffi::Array<int64_t> handles, int64_t stride) {
  constexpr const char* op = "peer_memory_map";
  FC_CHECK_VALUE(device >= 0, op) << "device (" << device << ") must be >= 0";
  FC_CHECK_VALUE(!handles.empty(), op) << "handles must not be empty";
  FC_CHECK_VALUE(stride > 0, op) << "stride (" << stride << ") must be > 0";
  DeviceScope scope(static_cast<int>(device), op);
  check_device(device, op);
  const size_t gran = granularity_of(device, op);
  const size_t row = static_cast<size_t>(stride), world = handles.size();
  FC_CHECK_VALUE(row % gran == 0, op)
      << "stride (" << stride << ") must be a multiple of the granularity " << gran;
  const Driver& d = driver(op);
  CUdeviceptr base = 0;
  FC_CU_CHECK(d.cuMemAddressReserve(&base, world * row, gran, 0, 0), op);
  size_t mapped = 0;  // rows mapped so far
  CUresult res = CUDA_SUCCESS;
  for (; mapped < world; ++mapped) {
    const auto h = static_cast<CUmemGenericAllocationHandle>(handles[mapped]);
    res = d.cuMemMap(base + mapped * row, row, 0, h, 0);
    if (res != CUDA_SUCCESS) break;
  }
  const bool rows_mapped = res == CUDA_SUCCESS;
  if (rows_mapped) {
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = static_cast<int>(device);
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    res = d.cuMemSetAccess(base, world * row, &access, 1);
  }
  if (res != CUDA_SUCCESS) {  // leave nothing mapped; the handles stay the caller's
    unmap_quietly(d, base, row, mapped, world);
    TVM_FFI_THROW(RuntimeError) << op << ": "
                                << (rows_mapped ? "cuMemSetAccess" : "cuMemMap of row ")
                                << (rows_mapped ? "" : std::to_string(mapped)) << " (of " << world
                                << " rows, stride " << stride << ") failed: " << result_name(res)
                                << " (" << static_cast<int>(res) << ")";
  }
  // The mappings now hold the memory; dropping the handles frees it at unmap. Releasing a
  // handle that cuMemMap has just accepted cannot fail, so the handles are always consumed here.
  for (int64_t h : handles) d.cuMemRelease(static_cast<CUmemGenericAllocationHandle>(h));
  return static_cast<int64_t>(base);
}

void peer_memory_unmap(int64_t device, int64_t base, int64_t stride, int64_t world) {
  constexpr const char* op = "peer_memory_unmap";
  FC_CHECK_VALUE(device >= 0, op) << "device (" << device << ") must be >= 0";
  FC_CHECK_VALUE(base != 0, op) << "base must not be null";
  FC_CHECK_VALUE(stride > 0, op) << "stride (" << stride << ") must be > 0";
  FC_CHECK_VALUE(world > 0, op) << "world (" << world << ") must be > 0";
  DeviceScope scope(static_cast<int>(device), op);
  FC_CUDA_CHECK(cudaDeviceSynchronize(), op);  // no kernel may still use the rows
  const Driver& d = driver(op);
  const auto ptr = static_cast<CUdeviceptr>(base);
  const size_t row = static_cast<size_t>(stride), rows = static_cast<size_t>(world);
  CUresult first = CUDA_SUCCESS;
  for (size_t q = 0; q < rows; ++q) {  // undo every row, then report the first failure
    CUresult res = d.cuMemUnmap(ptr + q * row, row);
    if (first == CUDA_SUCCESS) first = res;
  }
  CUresult res = d.cuMemAddressFree(ptr, rows * row);
  if (first == CUDA_SUCCESS) first = res;
  FC_CU_CHECK(first, op);
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(peer_memory_granularity, fusedcomm::peer_memory_granularity);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(peer_memory_create, fusedcomm::peer_memory_create);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(peer_memory_import, fusedcomm::peer_memory_import);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(peer_memory_release, fusedcomm::peer_memory_release);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(peer_memory_map, fusedcomm::peer_memory_map);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(peer_memory_unmap, fusedcomm::peer_memory_unmap);
