// Shared between the vLLM all-reduce binding and its per-dtype launch units.
#pragma once
#include <cuda_runtime.h>

#include "fusedcomm/kernels/allreduce_args.cuh"

namespace fusedcomm {

constexpr int kAllReduceThreads = kAllReduceMaxThreads;

// One definition per dtype, each in its own compile unit (vllm_ar_launch.cu with -DFC_DTYPE=...).
cudaError_t launch_allreduce_f32(const AllReduceArgs& a, bool twoshot, int blocks, cudaStream_t s);
cudaError_t launch_allreduce_f16(const AllReduceArgs& a, bool twoshot, int blocks, cudaStream_t s);
cudaError_t launch_allreduce_bf16(const AllReduceArgs& a, bool twoshot, int blocks, cudaStream_t s);

}  // namespace fusedcomm
