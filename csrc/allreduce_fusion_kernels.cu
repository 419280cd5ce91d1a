// One part of the kernel module allreduce_fusion_<dtype>_w<world>: the one-shot and two-shot
// kernels of the patterns in kFusionPartPatterns[FC_PART], at every row width. JIT key (set by
// python/fusedcomm/jit/allreduce_fusion.py): FC_DTYPE (a C++ type), FC_WORLD (2, 4, 8 or
// 0 = any), FC_PART (the row). The launcher unit (allreduce_fusion_launcher.cu) asks each part.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "allreduce_fusion.h"
#include "fusedcomm/kernels/allreduce_fusion_oneshot.cuh"
#include "fusedcomm/kernels/allreduce_fusion_twoshot.cuh"

#if !defined(FC_DTYPE) || !defined(FC_WORLD) || !defined(FC_PART)
#error "build through the JIT spec: FC_DTYPE, FC_WORLD and FC_PART are its key fields"
#endif

namespace fusedcomm {
namespace {

template <int kPattern, int kPacks>
FusionKernel pick(FusionAlgorithm algorithm) {
  if constexpr (PatternTraits<kPattern>::kMoe) {  // one-shot only
    return algorithm == kFusionOneshot
               ? &allreduce_fusion_oneshot<FC_DTYPE, FC_WORLD, kPattern, kPacks>
               : nullptr;
  } else {
    if (algorithm == kFusionTwoshot)
      return &allreduce_fusion_twoshot<FC_DTYPE, FC_WORLD, kPattern, kPacks>;
    return &allreduce_fusion_oneshot<FC_DTYPE, FC_WORLD, kPattern, kPacks>;
  }
}

// Patterns this dtype cannot run (NVFP4 and the MoE fusions take 16-bit activations) have no
// kernels.
template <int kPattern>
constexpr bool instantiated() {
  return kPattern >= 0 && (stages_of(kPattern).quant != Quant::kNvfp4 || sizeof(FC_DTYPE) == 2);
}

template <int kPattern>
FusionKernel pick(int pattern, FusionAlgorithm algorithm, int packs) {
  if constexpr (!instantiated<kPattern>()) {
    return nullptr;
  } else {
    if (pattern != kPattern) return nullptr;
    switch (packs) {
      case 1: return pick<kPattern, 1>(algorithm);
      case 2: return pick<kPattern, 2>(algorithm);
      case 4: return pick<kPattern, 4>(algorithm);
      case 8: return pick<kPattern, 8>(algorithm);
      default: return nullptr;
    }
  }
}

constexpr const int (&kRow)[4] = kFusionPartPatterns[FC_PART];

}  // namespace

template <>
FusionKernel fusion_pick<FC_PART>(int pattern, FusionAlgorithm algorithm, int packs) {
  FusionKernel k = pick<kRow[0]>(pattern, algorithm, packs);
  if (k == nullptr) k = pick<kRow[1]>(pattern, algorithm, packs);
  if (k == nullptr) k = pick<kRow[2]>(pattern, algorithm, packs);
  if (k == nullptr) k = pick<kRow[3]>(pattern, algorithm, packs);
  return k;
}

}  // namespace fusedcomm
