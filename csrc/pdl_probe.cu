// pdl_probe: a test kernel that reads what the kernel before it wrote, launched as a
// programmatic dependent launch (PDL). It proves that a producer which lets its dependents start
// early (griddepcontrol.launch_dependents) still hands over complete, visible data.
//   pdl_probe_launch(src, expect, mismatches, pdl): on the current stream, launch a kernel
//   that first waits for its programmatic dependency (pdl_wait), then adds to mismatches[0]
//   the number of elements of `src` whose bits differ from `expect`. `pdl` sets the launch
//   attribute cudaLaunchAttributeProgrammaticStreamSerialization; without it the kernel is an
//   ordinary stream-ordered launch.
#include "binding.h"
#include "fusedcomm/proto/pdl.cuh"

namespace fusedcomm {
namespace {

constexpr int kProbeThreads = 256;
constexpr int64_t kProbeMaxBlocks = 1024;

// Plain loads (no read-only cache path): the data may have been written by a grid that was
// still running when this one started.
template <typename Word>
__global__ void __launch_bounds__(kProbeThreads)
    pdl_probe(const Word* src, const Word* expect, int64_t n, int32_t* mismatches) {
  pdl_wait();
  int32_t count = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    count += src[i] != expect[i] ? 1 : 0;
  }
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) count += __shfl_xor_sync(0xffffffffu, count, m);
  if ((threadIdx.x & 31) == 0 && count != 0) atomicAdd(mismatches, count);
}

template <typename Word>
cudaError_t launch_probe(const void* src, const void* expect, int64_t n, int32_t* mismatches,
                         bool pdl, cudaStream_t stream) {
  const int64_t wanted = (n + kProbeThreads - 1) / kProbeThreads;
  const int64_t blocks = wanted < 1 ? 1 : (wanted < kProbeMaxBlocks ? wanted : kProbeMaxBlocks);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(kProbeThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, pdl_probe<Word>, static_cast<const Word*>(src),
                            static_cast<const Word*>(expect), n, mismatches);
}

bool on_device(const ffi::TensorView& t, int device) {
  return t.device().device_type == kDLCUDA && t.device().device_id == device;
}

}  // namespace

void pdl_probe_launch(ffi::TensorView src, ffi::TensorView expect, ffi::TensorView mismatches,
                      bool pdl) {
  constexpr const char* op = "pdl_probe_launch";
  // 1. validate
  FC_CHECK_VALUE(src.device().device_type == kDLCUDA, op) << "src must be a CUDA tensor";
  const int device = src.device().device_id;
  const DLDataType dt = src.dtype();
  const int bits = dt.bits * dt.lanes;
  FC_CHECK_TYPE(bits == 8 || bits == 16 || bits == 32, op)
      << "src has " << bits << "-bit elements; expected 8, 16 or 32 bits";
  FC_CHECK_TYPE(expect.dtype().code == dt.code && expect.dtype().bits == dt.bits &&
                    expect.dtype().lanes == dt.lanes,
                op)
      << "expect (" << dtype_name(expect.dtype()) << ") must have src's dtype (" << dtype_name(dt)
      << ")";
  FC_CHECK_VALUE(on_device(expect, device), op) << "expect must be on cuda:" << device;
  FC_CHECK_VALUE(src.is_contiguous() && expect.is_contiguous(), op)
      << "src and expect must be contiguous";
  FC_CHECK_VALUE(expect.numel() == src.numel(), op)
      << "expect has " << expect.numel() << " elements, src " << src.numel();
  FC_CHECK_TYPE(mismatches.dtype().code == kDLInt && mismatches.dtype().bits == 32 &&
                    mismatches.dtype().lanes == 1,
                op)
      << "mismatches must be an int32 tensor";
  FC_CHECK_VALUE(on_device(mismatches, device) && mismatches.numel() >= 1, op)
      << "mismatches must hold at least one element on cuda:" << device;
  // 2. device and stream
  DeviceScope scope(device, op);
  cudaStream_t stream = stream_for(device);
  // 3. launch
  const void* s = data_of(src);
  const void* e = data_of(expect);
  auto* counter = static_cast<int32_t*>(data_of(mismatches));
  const int64_t n = src.numel();
  cudaError_t err = cudaSuccess;
  if (bits == 8) {
    err = launch_probe<uint8_t>(s, e, n, counter, pdl, stream);
  } else if (bits == 16) {
    err = launch_probe<uint16_t>(s, e, n, counter, pdl, stream);
  } else {
    err = launch_probe<uint32_t>(s, e, n, counter, pdl, stream);
  }
  FC_CUDA_CHECK(err, op);
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(pdl_probe_launch, fusedcomm::pdl_probe_launch);
