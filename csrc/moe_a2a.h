// The MoE all-to-all family, host side: what the control unit (moe_a2a.cu) asks of the kernel
// units (moe_a2a_kernels.cu, one per part, compiled in parallel into the same module).
//
// Part 0 holds dispatch and sanitize; parts 1, 2, 3 the combine kernels of float16, bfloat16
// and float32 (every pairwise-tree top_k and the sequential one); part 4 the low-precision
// wire (its staging kernel and the bfloat16 combine kernels that read it). The JIT spec
// (python/fusedcomm/jit/moe_a2a.py) lists one unit per part.
#pragma once
#include <cuda_runtime.h>

#include "fusedcomm/kernels/moe_a2a_args.cuh"

namespace fusedcomm {

constexpr int kMoeA2AParts = 5;
constexpr int kMoeA2AThreads = 256;  // per block, every kernel of the family

enum class CombineDType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

// Launch on `stream`, programmatic dependent launch when `pdl`. Dispatch: `want` blocks (the
// local tokens), capped at what the device holds at once (each block then copies several
// tokens back to back).
cudaError_t launch_moe_dispatch(const MoeDispatchArgs& a, int want, int sms, bool pdl,
                                cudaStream_t stream);
// Sanitize: `blocks` blocks.
cudaError_t launch_moe_sanitize(const MoeSanitizeArgs& a, int blocks, bool pdl,
                                cudaStream_t stream);

// Combine: `want` blocks (what the work could use), capped at what an idle device holds of
// this kernel at once. The blocks need not all be resident (none waits for another that may
// not have started; kernels/moe_a2a_combine.cuh), so kernels on other streams slow it down
// without stalling it.
template <CombineDType kD>
cudaError_t launch_moe_combine(const MoeCombineArgs& a, int want, int sms, bool pdl,
                               cudaStream_t stream);

// The combine on the low-precision wire: the staging kernel (kernels/moe_a2a_quantize.cuh)
// writes the payload's MXFP8 rows into the own combine region, then the combine pulls them
// (`want` blocks, capped as above); kBf16Payload: the payload's dtype (else float16).
template <bool kBf16Payload>
cudaError_t launch_moe_combine_wire(const MoeCombineArgs& a, int want, int sms, bool pdl,
                                    cudaStream_t stream);

// A launch with the family's block size and the PDL attribute.
template <typename... Params, typename... Args>
cudaError_t launch_moe_kernel(void (*kernel)(Params...), int blocks, bool pdl, cudaStream_t stream,
                              const Args&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kMoeA2AThreads);
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

}  // namespace fusedcomm
