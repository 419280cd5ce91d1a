// Instantiates the one-shot and two-shot all-reduce kernels for one dtype (FC_DTYPE) and every
// world-size specialisation (2, 4, 8, and 0 = any size at run time).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fusedcomm/kernels/allreduce_oneshot.cuh"
#include "fusedcomm/kernels/allreduce_twoshot.cuh"
#include "vllm_ar.h"

#if !defined(FC_DTYPE)
#error "compile with -DFC_DTYPE=f32|f16|bf16"
#endif

namespace fusedcomm {
namespace {

template <typename T, int kWorld>
cudaError_t launch_world(const AllReduceArgs& a, bool twoshot, int blocks, cudaStream_t s) {
  if (twoshot) {
    allreduce_twoshot<T, kWorld><<<blocks, kAllReduceThreads, 0, s>>>(a);
  } else {
    allreduce_oneshot<T, kWorld><<<blocks, kAllReduceThreads, 0, s>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const AllReduceArgs& a, bool twoshot, int blocks, cudaStream_t s) {
  switch (a.world) {
    case 2: return launch_world<T, 2>(a, twoshot, blocks, s);
    case 4: return launch_world<T, 4>(a, twoshot, blocks, s);
    case 8: return launch_world<T, 8>(a, twoshot, blocks, s);
    default: return launch_world<T, 0>(a, twoshot, blocks, s);
  }
}

}  // namespace

namespace dtypes {
using f32 = float;
using f16 = __half;
using bf16 = __nv_bfloat16;
}  // namespace dtypes

#define FC_CAT2(a, b) a##b
#define FC_CAT(a, b) FC_CAT2(a, b)

cudaError_t FC_CAT(launch_allreduce_, FC_DTYPE)(const AllReduceArgs& a, bool twoshot, int blocks,
                                                cudaStream_t s) {
  return launch<dtypes::FC_DTYPE>(a, twoshot, blocks, s);
}

}  // namespace fusedcomm
