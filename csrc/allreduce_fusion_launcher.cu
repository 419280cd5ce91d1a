// allreduce_fusion_<dtype>_w<world>: the launcher unit of a kernel module (the kernels are in
// its parts, allreduce_fusion_kernels.cu). JIT key: FC_DTYPE, FC_WORLD (as the parts).
//   allreduce_fusion_launcher() -> address of the FusionLauncher the control module calls
//   allreduce_fusion_abi() -> kFusionAbi of the headers this module was built from
#include "allreduce_fusion.h"
#include "binding.h"

namespace fusedcomm {

template <>
FusionKernel fusion_pick<0>(int, FusionAlgorithm, int);
template <>
FusionKernel fusion_pick<1>(int, FusionAlgorithm, int);
template <>
FusionKernel fusion_pick<2>(int, FusionAlgorithm, int);
template <>
FusionKernel fusion_pick<3>(int, FusionAlgorithm, int);
template <>
FusionKernel fusion_pick<4>(int, FusionAlgorithm, int);
static_assert(kFusionParts == 5, "declare and ask every part");

namespace {

FusionKernel pick(int pattern, FusionAlgorithm algorithm, int packs) {
  FusionKernel k = fusion_pick<0>(pattern, algorithm, packs);
  if (k == nullptr) k = fusion_pick<1>(pattern, algorithm, packs);
  if (k == nullptr) k = fusion_pick<2>(pattern, algorithm, packs);
  if (k == nullptr) k = fusion_pick<3>(pattern, algorithm, packs);
  if (k == nullptr) k = fusion_pick<4>(pattern, algorithm, packs);
  return k;
}

cudaError_t launch(const FusionArgs& a, const FusionPlan& plan, int pattern, bool pdl,
                   cudaStream_t stream) {
  FusionKernel kernel = pick(pattern, plan.algorithm, plan.packs);
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
