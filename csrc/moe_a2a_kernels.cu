// moe_a2a: the kernel units. JIT key: FC_PART (0: dispatch and sanitize; 1, 2, 3: the combine
// kernels of float16, bfloat16, float32; 4: the low-precision wire). See moe_a2a.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "moe_a2a.h"

#if FC_PART == 0
#include "fusedcomm/kernels/moe_a2a_dispatch.cuh"
#include "fusedcomm/kernels/moe_a2a_sanitize.cuh"
#elif FC_PART == 4
#include "fusedcomm/kernels/moe_a2a_combine.cuh"
#include "fusedcomm/kernels/moe_a2a_quantize.cuh"
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
  return launch_moe_kernel(kernel, blocks < 1 ? 1 : blocks, pdl, stream, a);
}

cudaError_t launch_moe_sanitize(const MoeSanitizeArgs& a, int blocks, bool pdl,
                                cudaStream_t stream) {
  return launch_moe_kernel(moe_a2a_sanitize, blocks, pdl, stream, a);
}

#elif FC_PART == 4

namespace {

template <typename T>
void (*wire_kernel(int64_t packs))(MoeCombineArgs) {
  if (packs <= kMoeA2AThreads) return moe_a2a_wire<T, 1, kMoeA2AThreads>;
  if (packs <= 2 * kMoeA2AThreads) return moe_a2a_wire<T, 2, kMoeA2AThreads>;
  if (packs <= 4 * kMoeA2AThreads) return moe_a2a_wire<T, 4, kMoeA2AThreads>;
  return moe_a2a_wire<T, 8, kMoeA2AThreads>;
}

void (*wire_combine(int top_k))(MoeCombineArgs) {
  using B = __nv_bfloat16;
  switch (top_k) {
    case 2: return moe_a2a_combine<B, 2, kMoeA2AThreads, true>;
    case 4: return moe_a2a_combine<B, 4, kMoeA2AThreads, true>;
    case 6: return moe_a2a_combine<B, 6, kMoeA2AThreads, true>;
    case 8: return moe_a2a_combine<B, 8, kMoeA2AThreads, true>;
    case 10: return moe_a2a_combine<B, 10, kMoeA2AThreads, true>;
    case 16: return moe_a2a_combine<B, 16, kMoeA2AThreads, true>;
    case 22: return moe_a2a_combine<B, 22, kMoeA2AThreads, true>;
    default: return moe_a2a_combine<B, 0, kMoeA2AThreads, true>;
  }
}

}  // namespace

template <bool kBf16Payload>
cudaError_t launch_moe_combine_wire(const MoeCombineArgs& a, int want, int sms, bool pdl,
                                    cudaStream_t stream) {
  using P = std::conditional_t<kBf16Payload, __nv_bfloat16, __half>;
  auto stage = wire_kernel<P>(a.row_bytes / 16);
  const int64_t slots = int64_t{a.site.world} * a.max_tokens;
  const int stage_blocks = static_cast<int>(slots < int64_t{sms} * 4 ? slots : int64_t{sms} * 4);
  cudaError_t err = launch_moe_kernel(stage, stage_blocks, pdl, stream, a);
  if (err != cudaSuccess) return err;
  MoeCombineArgs pull = a;
  pull.payload = nullptr;  // the wire rows are in the own region now: every rank pulls them
  auto kernel = wire_combine(a.top_k);
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kMoeA2AThreads, 0);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorLaunchOutOfResources;
  const int64_t cap = int64_t{per_sm} * sms;
  const int blocks = static_cast<int>(want < cap ? want : cap);
  return launch_moe_kernel(kernel, blocks < 1 ? 1 : blocks, pdl, stream, pull);
}

template cudaError_t launch_moe_combine_wire<false>(const MoeCombineArgs&, int, int, bool,
                                                    cudaStream_t);
template cudaError_t launch_moe_combine_wire<true>(const MoeCombineArgs&, int, int, bool,
                                                   cudaStream_t);

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
  return launch_moe_kernel(kernel, blocks < 1 ? 1 : blocks, pdl, stream, a);
}

#endif

}  // namespace fusedcomm
