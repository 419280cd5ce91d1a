// allreduce_fusion_<dtype>_w<world>: the one-shot and two-shot kernels of one configuration,
// every pattern and row width. JIT key (set by python/fusedcomm/jit/allreduce_fusion.py):
// FC_DTYPE (a C++ type), FC_WORLD (2, 4, 8 or 0 = any).
//   allreduce_fusion_launcher() -> address of the FusionLauncher the control module calls
//   allreduce_fusion_abi() -> kFusionAbi of the headers this module was built from
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "allreduce_fusion.h"
#include "binding.h"
#include "fusedcomm/kernels/allreduce_fusion_oneshot.cuh"
#include "fusedcomm/kernels/allreduce_fusion_twoshot.cuh"

#if !defined(FC_DTYPE) || !defined(FC_WORLD)
#error "build through the JIT spec: FC_DTYPE and FC_WORLD are its key fields"
#endif

namespace fusedcomm {
namespace {

using Kernel = void (*)(FusionArgs);

template <int kPattern, int kPacks>
Kernel pick(FusionAlgorithm algorithm) {
  if (algorithm == kFusionTwoshot)
    return &allreduce_fusion_twoshot<FC_DTYPE, FC_WORLD, kPattern, kPacks>;
  return &allreduce_fusion_oneshot<FC_DTYPE, FC_WORLD, kPattern, kPacks>;
}

template <int kPattern>
Kernel pick(FusionAlgorithm algorithm, int packs) {
  switch (packs) {
    case 1: return pick<kPattern, 1>(algorithm);
    case 2: return pick<kPattern, 2>(algorithm);
    case 4: return pick<kPattern, 4>(algorithm);
    case 8: return pick<kPattern, 8>(algorithm);
    default: return nullptr;
  }
}

Kernel pick(int pattern, FusionAlgorithm algorithm, int packs) {
  switch (pattern) {
    case 0: return pick<0>(algorithm, packs);
    case 1: return pick<1>(algorithm, packs);
    case 2: return pick<2>(algorithm, packs);
    case 4: return pick<4>(algorithm, packs);
    case 10: return pick<10>(algorithm, packs);
    case 11: return pick<11>(algorithm, packs);
    default: return nullptr;
  }
}

cudaError_t launch(const FusionArgs& a, const FusionPlan& plan, int pattern, bool pdl,
                   cudaStream_t stream) {
  Kernel kernel = pick(pattern, plan.algorithm, plan.packs);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(plan.blocks);
  config.blockDim = dim3(plan.threads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, a);
}

}  // namespace
}  // namespace fusedcomm

FC_EXPORT_KERNEL_MODULE(allreduce_fusion, FusionLauncher, kFusionAbi);
