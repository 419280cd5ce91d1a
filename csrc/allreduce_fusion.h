// The Lamport all-reduce family, host side: the launcher type the per-configuration kernel
// modules export, the ABI stamp, and the planner (a pure function, so all ranks decide alike).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "fusedcomm/kernels/allreduce_fusion_args.cuh"

namespace fusedcomm {

struct FusionPlan {
  FusionAlgorithm algorithm;
  int threads;  // per block: a multiple of 32, >= kMaxRanks
  int packs;    // packs per thread: 1, 2, 4 or 8 (the kernel's kPacks)
  int blocks;
};

// A kernel module (one dtype x world size, every pattern) is built from kFusionParts compile
// units (compiled in parallel) and one launcher unit; part k instantiates the kernels of the
// patterns in row k (-1: none). The JIT spec (python/fusedcomm/jit/allreduce_fusion.py) lists
// one unit per part; describe() reports kFusionParts so a test can hold the two together.
constexpr int kFusionParts = 5;
constexpr int kFusionPartPatterns[kFusionParts][4] = {
    {0, 1, -1, -1}, {2, 4, 10, 11}, {3, 5, -1, -1}, {8, 9, -1, -1}, {6, 7, -1, -1}};

using FusionKernel = void (*)(FusionArgs);

// Defined by part kPart's unit: the kernel for (pattern, algorithm, packs per thread), or null
// when the part does not hold it.
template <int kPart>
FusionKernel fusion_pick(int pattern, FusionAlgorithm algorithm, int packs);

// A kernel module exports the address of one of these.
using FusionLauncher = cudaError_t (*)(const FusionArgs&, const FusionPlan&, int pattern, bool pdl,
                                       cudaStream_t);
constexpr int64_t kFusionAbi = int64_t{20261202} * 4096 + int64_t{sizeof(FusionArgs)};

// Below this many MiB of N*D*2*W*elem, auto picks one-shot for 4 and 8 ranks (FlashInfer's
// crossover, tuned on B200; not yet measured on H200). Two ranks: one-shot whenever it fits,
// since it moves the same bytes as two-shot with no meeting.
constexpr int64_t kOneshotMaxMiB4 = 64;
constexpr int64_t kOneshotMaxMiB8 = 42;

// token_num >= 1, hidden * elem a positive multiple of 16 and <= 128 KiB, 2 <= world <=
// kMaxRanks; segment_bytes: the workspace's Lamport segment; requested: kFusionAuto,
// kFusionOneshot or kFusionTwoshot. A one-shot call that does not fit one segment runs
// two-shot (as FlashInfer does).
inline FusionPlan plan_fusion(int64_t token_num, int64_t hidden, int elem, int world,
                              int64_t segment_bytes, FusionAlgorithm requested) {
  const int64_t row_packs = hidden * elem / 16;
  const int64_t bytes = token_num * hidden * elem;
  const bool fits = int64_t{world} * bytes <= segment_bytes;
  FusionAlgorithm algorithm = requested;
  if (algorithm == kFusionAuto) {
    const int64_t traffic = bytes * 2 * world;
    const int64_t limit = (world <= 4 ? kOneshotMaxMiB4 : kOneshotMaxMiB8) << 20;
    const bool small = world == 2 || traffic <= limit;
    algorithm = small ? kFusionOneshot : kFusionTwoshot;
  }
  if (algorithm == kFusionOneshot && !fits) algorithm = kFusionTwoshot;
  int packs = 1;
  while (packs < kFusionMaxPacks && int64_t{packs} * kFusionMaxThreads < row_packs) packs *= 2;
  int64_t threads = (row_packs + packs - 1) / packs;
  threads = (threads + 31) / 32 * 32;
  const int64_t blocks = algorithm == kFusionOneshot
                             ? token_num
                             : (token_num < kMaxBlocks ? token_num : int64_t{kMaxBlocks});
  return FusionPlan{algorithm, static_cast<int>(threads), packs, static_cast<int>(blocks)};
}

}  // namespace fusedcomm
