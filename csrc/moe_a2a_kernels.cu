// moe_a2a: the kernel units. JIT key: FC_PART (0: dispatch and sanitize; 1, 2, 3: the combine
// kernels of float16, bfloat16, float32). See moe_a2a.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "moe_a2a.h"

#if FC_PART == 0
#include "fusedcomm/kernels/moe_a2a_dispatch.cuh"
#include "fusedcomm/kernels/moe_a2a_sanitize.cuh"
#else
#include "fusedcomm/kernels/moe_a2a_combine.cuh"
#endif

namespace fusedcomm {

#if FC_PART == 0

cudaError_t launch_moe_dispatch(const MoeDispatchArgs& a, int want, int sms, bool pdl,
                                cudaStream_t stream) {
  auto kernel = moe_a2a_dispatch<kMoeA2AThreads>;
  int per_sm = 0;
  cudaError_t err =
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kMoeA2AThreads, 0);
  if (err != cudaSuccess) return err;
  const int64_t cap = int64_t{per_sm < 1 ? 1 : per_sm} * sms;
  const int blocks = static_cast<int>(want < cap ? want : cap);
  return launch_moe_kernel(kernel, a, blocks < 1 ? 1 : blocks, pdl, stream);
}

cudaError_t launch_moe_sanitize(const MoeSanitizeArgs& a, int blocks, bool pdl,
                                cudaStream_t stream) {
  return launch_moe_kernel(moe_a2a_sanitize, a, blocks, pdl, stream);
}

#else

namespace {

#if FC_PART == 1
using T = __half;
constexpr CombineDType kD = CombineDType::kF16;
#elif FC_PART == 2
using T = __nv_bfloat16;
constexpr CombineDType kD = CombineDType::kBF16;
#else
using T = float;
constexpr CombineDType kD = CombineDType::kF32;
#endif

using CombineKernel = void (*)(MoeCombineArgs);

CombineKernel pick(int top_k) {
  switch (top_k) {
    case 2: return moe_a2a_combine<T, 2, kMoeA2AThreads>;
    case 4: return moe_a2a_combine<T, 4, kMoeA2AThreads>;
    case 6: return moe_a2a_combine<T, 6, kMoeA2AThreads>;
    case 8: return moe_a2a_combine<T, 8, kMoeA2AThreads>;
    case 10: return moe_a2a_combine<T, 10, kMoeA2AThreads>;
    case 16: return moe_a2a_combine<T, 16, kMoeA2AThreads>;
    case 22: return moe_a2a_combine<T, 22, kMoeA2AThreads>;
    default: return moe_a2a_combine<T, 0, kMoeA2AThreads>;
  }
}

}  // namespace

template <>
cudaError_t launch_moe_combine<kD>(const MoeCombineArgs& a, int want, int sms, bool pdl,
                                   cudaStream_t stream) {
  CombineKernel kernel = pick(a.top_k);
  int per_sm = 0;
  cudaError_t err =
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kMoeA2AThreads, 0);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorLaunchOutOfResources;
  const int64_t cap = int64_t{per_sm} * sms;
  const int blocks = static_cast<int>(want < cap ? want : cap);
  return launch_moe_kernel(kernel, a, blocks < 1 ? 1 : blocks, pdl, stream);
}

#endif

}  // namespace fusedcomm
