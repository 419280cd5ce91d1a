// moe_a2a_quant: the quantised outputs of the MoE all-to-all combine (host entry and kernels).
//   moe_a2a_quantize_launch(rows, out, scales, mode, sf_layout, global_scale, pdl)
// `rows`: the combine's [L, H] output of float16 / bfloat16 (contiguous, on the device);
// mode 0: NVFP4 (out [L, H/2] bytes, E4M3 scales per 16, global scale G), 1: MXFP8 (out
// [L, H] bytes, UE8M0 scales per 32), 2: MXFP4 (out [L, H/2] bytes, UE8M0 scales per 32).
// `scales` holds exactly the bytes of the SfLayout (layout/quant_scales.cuh) of L rows. The
// frontend (python/fusedcomm/ops/_moe_a2a_extensions.py) checks the dtypes; this entry checks
// every number that decides where the kernel reads or writes, then launches on the current
// stream of the tensors' device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "binding.h"
#include "fusedcomm/epilogue/quant_mx.cuh"
#include "fusedcomm/epilogue/quant_nvfp4.cuh"
#include "fusedcomm/kernels/moe_a2a_quantize.cuh"
#include "moe_a2a.h"

namespace fusedcomm {

namespace {

constexpr int kMaxRowPacks = 8;  // packs per thread: hidden <= 8 * 8 * kMoeA2AThreads

template <typename T, typename Q>
cudaError_t launch_rows(const MoeQuantizeArgs& a, const Q& q, int blocks, bool pdl,
                        cudaStream_t stream) {
  void (*kernel)(MoeQuantizeArgs, Q) = nullptr;
  if (a.packs <= kMoeA2AThreads) {
    kernel = moe_a2a_quantize<T, 1, Q, kMoeA2AThreads>;
  } else if (a.packs <= 2 * kMoeA2AThreads) {
    kernel = moe_a2a_quantize<T, 2, Q, kMoeA2AThreads>;
  } else if (a.packs <= 4 * kMoeA2AThreads) {
    kernel = moe_a2a_quantize<T, 4, Q, kMoeA2AThreads>;
  } else {
    kernel = moe_a2a_quantize<T, kMaxRowPacks, Q, kMoeA2AThreads>;
  }
  return launch_moe_kernel(kernel, blocks, pdl, stream, a, q);
}

template <typename T>
cudaError_t launch_mode(int64_t mode, const MoeQuantizeArgs& a, void* out, uint8_t* scales,
                        SfLayout layout, float global, int blocks, bool pdl, cudaStream_t s) {
  if (mode == 0) return launch_rows<T>(a, QuantNvfp4{out, scales, layout, global}, blocks, pdl, s);
  if (mode == 1) return launch_rows<T>(a, QuantMxfp8{out, scales, layout}, blocks, pdl, s);
  return launch_rows<T>(a, QuantMxfp4{out, scales, layout}, blocks, pdl, s);
}

}  // namespace

void moe_a2a_quantize_launch(ffi::TensorView rows, ffi::TensorView out, ffi::TensorView scales,
                             int64_t mode, int64_t sf_layout, double global_scale, bool pdl) {
  constexpr const char* op = "moe_a2a_combine";
  const DType dt = dtype_of(rows.dtype());
  FC_CHECK_TYPE(dt == DType::kF16 || dt == DType::kBF16, op)
      << "quantised outputs need a float16 or bfloat16 payload, got " << dtype_name(rows.dtype());
  FC_CHECK_VALUE(mode >= 0 && mode <= 2, op) << "internal: quantisation mode " << mode;
  FC_CHECK_VALUE(sf_layout >= kSfSwizzled128x4 && sf_layout <= kSfLinear, op)
      << "sf_layout (" << sf_layout << ") must be an SfLayout value (0, 1 or 2)";
  FC_CHECK_VALUE(
      rows.ndim() == 2 && rows.IsContiguous() && out.IsContiguous() && scales.IsContiguous(), op)
      << "the combined rows, the output and output_scales must be contiguous";
  const int device = rows.device().device_id;
  for (const ffi::TensorView* t : {&rows, &out, &scales}) {
    FC_CHECK_VALUE(t->device().device_type == kDLCUDA && t->device().device_id == device, op)
        << "the output and output_scales must be on the payload's device (cuda:" << device << ")";
  }
  const int64_t local = rows.shape()[0], hidden = rows.shape()[1];
  const int64_t block = mode == 0 ? 16 : 32;
  FC_CHECK_VALUE(hidden >= block && hidden % block == 0, op)
      << "hidden (" << hidden << ") must be a positive multiple of " << block
      << " for this quantised output";
  FC_CHECK_VALUE(hidden / 8 <= int64_t{kMaxRowPacks} * kMoeA2AThreads, op)
      << "hidden (" << hidden << ") must be at most " << 8 * kMaxRowPacks * kMoeA2AThreads
      << " for quantised outputs";
  const int64_t out_bytes = mode == 1 ? local * hidden : local * hidden / 2;
  FC_CHECK_VALUE(nbytes(out) == out_bytes && reinterpret_cast<uintptr_t>(data_of(out)) % 8 == 0, op)
      << "the quantised output must hold " << out_bytes << " bytes at an 8-byte aligned address, "
      << "got " << nbytes(out);
  const SfLayout layout{static_cast<int32_t>(sf_layout), static_cast<int32_t>(hidden / block)};
  FC_CHECK_VALUE(nbytes(scales) == layout.bytes(local), op)
      << "output_scales must hold exactly " << layout.bytes(local) << " bytes (" << local
      << " rows, " << hidden / block << " scale columns, sf_layout " << sf_layout << "), got "
      << nbytes(scales);
  FC_CHECK_VALUE(reinterpret_cast<uintptr_t>(data_of(rows)) % 16 == 0, op)
      << "internal: the combined rows must be 16-byte aligned";
  if (local == 0) return;
  MoeQuantizeArgs a{};
  a.in = static_cast<const uint8_t*>(data_of(rows));
  a.rows = local;
  a.packs = static_cast<int32_t>(hidden / 8);
  DeviceScope scope(device, op);
  int sms = 0;
  FC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), op);
  const int blocks = static_cast<int>(std::min<int64_t>(local, int64_t{sms} * 4));
  auto* sf = static_cast<uint8_t*>(data_of(scales));
  const float g = static_cast<float>(global_scale);
  cudaStream_t stream = stream_for(device);
  FC_CUDA_CHECK(
      dt == DType::kF16
          ? launch_mode<__half>(mode, a, data_of(out), sf, layout, g, blocks, pdl, stream)
          : launch_mode<__nv_bfloat16>(mode, a, data_of(out), sf, layout, g, blocks, pdl, stream),
      op);
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_a2a_quantize_launch, fusedcomm::moe_a2a_quantize_launch);
