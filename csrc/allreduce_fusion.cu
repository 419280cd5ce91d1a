// allreduce_fusion: the Lamport all-reduce family (fused residual / RMSNorm / FP8), host side.
// Host code only: the kernels live in the per-configuration modules
// (allreduce_fusion_kernels.cu), whose launcher the caller passes with each call.
//
// Exports the workspace sizes (from FusionLayout), the planner, control block creation, and
// the launch entry: validate, device + stream, build FusionArgs and launch.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/optional.h>

#include <cmath>

#include "allreduce_fusion.h"
#include "allreduce_fusion_call.h"
#include "binding.h"

namespace fusedcomm {

int64_t allreduce_fusion_abi() { return kFusionAbi; }

ffi::Map<ffi::String, ffi::Any> allreduce_fusion_describe() {
  auto m =
      describe_family("allreduce_fusion", kOpAllReduceFusion, {"lamport pull", "staged", "reduced"},
                      {{"max_ranks", kMaxRanks},
                       {"kernel_parts", kFusionParts},
                       {"max_quant_groups", kMaxQuantGroups},
                       {"max_row_bytes", kMaxRowBytes},
                       {"max_segment_bytes", kFusionMaxSegmentBytes},
                       {"control_bytes", sizeof(FusionControl)}});
  ffi::Array<int64_t> patterns;
  for (const PatternStages& s : kPatternStages) patterns.push_back(s.pattern);
  m.Set("patterns", patterns);
  return m;
}

// [comm, flags, lamport, segment] bytes of one rank's workspace.
ffi::Array<int64_t> allreduce_fusion_workspace_bytes(int64_t world, int64_t max_token_num,
                                                     int64_t hidden, int64_t elem) {
  constexpr const char* op = "fusion_workspace_bytes";
  FC_CHECK_VALUE(world >= 1 && world <= kMaxRanks, op)
      << "world_size (" << world << ") must be in [1, " << kMaxRanks << "]";
  FC_CHECK_VALUE(max_token_num >= 1 && hidden >= 1, op)
      << "max_token_num (" << max_token_num << ") and hidden_dim (" << hidden << ") must be >= 1";
  FC_CHECK_VALUE(elem == 2 || elem == 4, op) << "element size (" << elem << ") must be 2 or 4";
  const FusionLayout l{static_cast<int>(world), max_token_num * hidden, static_cast<int>(elem)};
  return ffi::Array<int64_t>{l.comm_bytes(), l.flags_bytes(), l.lamport_bytes(), l.segment_bytes()};
}

// [algorithm, threads, packs per thread, blocks] of one call (see plan_fusion).
ffi::Array<int64_t> allreduce_fusion_plan(int64_t token_num, int64_t hidden, int64_t elem,
                                          int64_t world, int64_t segment_bytes, int64_t requested) {
  constexpr const char* op = "allreduce_fusion_plan";
  FC_CHECK_VALUE(token_num >= 1, op) << "token_num (" << token_num << ") must be >= 1";
  FC_CHECK_VALUE(elem == 2 || elem == 4, op) << "element size (" << elem << ") must be 2 or 4";
  FC_CHECK_VALUE(hidden >= 1 && hidden * elem % 16 == 0 && hidden * elem <= kMaxRowBytes, op)
      << "hidden_dim (" << hidden << ") must be a positive multiple of " << 16 / elem
      << " and at most " << kMaxRowBytes / elem;
  FC_CHECK_VALUE(world >= 2 && world <= kMaxRanks, op)
      << "world_size (" << world << ") must be in [2, " << kMaxRanks << "]";
  FC_CHECK_VALUE(requested >= kFusionAuto && requested <= kFusionTwoshot, op)
      << "algorithm (" << requested << ") must be 0 (auto), 1 (one-shot) or 2 (two-shot)";
  const FusionPlan p =
      plan_fusion(token_num, hidden, static_cast<int>(elem), static_cast<int>(world), segment_bytes,
                  static_cast<FusionAlgorithm>(requested));
  return ffi::Array<int64_t>{p.algorithm, p.threads, p.packs, p.blocks};
}

// A zero-initialised control block on `device` (first call: segment 0, nothing to clear).
int64_t allreduce_fusion_control_create(int64_t device, int64_t segment_bytes) {
  constexpr const char* op = "allreduce_fusion_control_create";
  FC_CHECK_VALUE(
      segment_bytes > 0 && segment_bytes <= kFusionMaxSegmentBytes && segment_bytes % 16 == 0, op)
      << "segment_bytes (" << segment_bytes << ") must be a positive multiple of 16 and at most "
      << kFusionMaxSegmentBytes;
  DeviceScope scope(static_cast<int>(device), op);
  FusionControl init{};
  init.segment_bytes = static_cast<int32_t>(segment_bytes);
  void* ptr = nullptr;
  FC_CUDA_CHECK(cudaMalloc(&ptr, sizeof(FusionControl)), op);
  const cudaError_t err = cudaMemcpy(ptr, &init, sizeof(init), cudaMemcpyHostToDevice);
  if (err != cudaSuccess) {
    cudaFree(ptr);
    FC_CUDA_CHECK(err, op);
  }
  return reinterpret_cast<int64_t>(ptr);
}

void allreduce_fusion_control_destroy(int64_t device, int64_t ptr) {
  constexpr const char* op = "allreduce_fusion_control_destroy";
  DeviceScope scope(static_cast<int>(device), op);
  FC_CUDA_CHECK(cudaFree(reinterpret_cast<void*>(ptr)), op);
}

void allreduce_fusion_launch(ffi::TensorView input, ffi::TensorView table, int64_t pattern,
                             int64_t token_num, int64_t hidden, int64_t world, int64_t rank,
                             int64_t control, int64_t segment_bytes, int64_t comm_bytes,
                             int64_t claim, int64_t record, double timeout_s, bool pdl,
                             bool trigger_at_end, bool fp32_acc, int64_t algorithm,
                             OptTensor allreduce_out, OptTensor residual_in, OptTensor residual_out,
                             OptTensor norm_out, OptTensor quant_out, OptTensor scale_out,
                             OptTensor rms_gamma, double rms_eps, OptTensor scale_factor,
                             int64_t sf_layout, int64_t group_size, double weight_bias,
                             int64_t launcher) {
  constexpr const char* op = "allreduce_fusion";
  // 1. validate
  const PatternStages st = stages_of(static_cast<int>(pattern));
  FC_CHECK_VALUE(st.pattern == pattern && st.input == Input::kRows, op)
      << "pattern (" << pattern << ") has no kernel here (the MoE patterns have their own entry)";
  const CallShape c = check_call_shape(op, input, "allreduce_in", table, token_num, hidden, world,
                                       rank, control, claim, record, launcher, timeout_s);
  const int64_t numel = token_num * hidden, elem = c.elem;
  const int device = c.device;
  const bool fp8 =
      st.quant == Quant::kStatic || st.quant == Quant::kDynamic || st.quant == Quant::kGroupFp8;
  FusionArgs a{};
  a.input = rows_of(input, "allreduce_in", numel, elem, device, true, op);
  a.allreduce_out = rows_of(allreduce_out, "allreduce_out", numel, elem, device, !st.norm, op);
  a.residual_in = rows_of(residual_in, "residual_in", numel, elem, device, st.norm, op);
  a.residual_out = rows_of(residual_out, "residual_out", numel, elem, device, st.norm, op);
  a.norm_out = rows_of(norm_out, "norm_out", numel, elem, device, st.norm_out, op);
  a.gamma = rows_of(rms_gamma, "rms_gamma", hidden, elem, device, st.norm, op);
  a.quant_out = fp8 ? rows_of(quant_out, "quant_out", numel, 1, device, true, op) : nullptr;
  const bool global_scale = st.quant == Quant::kStatic || st.quant == Quant::kNvfp4;
  a.scale_factor = static_cast<const float*>(
      rows_of(scale_factor, "scale_factor", 1, 4, device, global_scale, op, 4));
  if (st.quant == Quant::kDynamic) {
    a.scale_out = rows_of(scale_out, "scale_out", token_num, 4, device, true, op, 4);
  } else if (st.quant == Quant::kNvfp4) {
    nvfp4_outputs(a, op, quant_out, scale_out, sf_layout, c, token_num, hidden);
  } else if (st.quant == Quant::kGroupFp8) {
    FC_CHECK_VALUE(group_size > 0 && hidden % group_size == 0, op)
        << "block_quant_group_size (" << group_size << ") must be positive and divide hidden_dim ("
        << hidden << ")";
    FC_CHECK_VALUE(hidden / group_size <= kMaxQuantGroups, op)
        << "hidden_dim / block_quant_group_size (" << hidden / group_size << ") must be at most "
        << kMaxQuantGroups;
    a.group_size = static_cast<int32_t>(group_size);
    const PackedUe8m0 layout{token_num, static_cast<int32_t>(hidden / group_size)};
    a.scale_out = bytes_of(scale_out, "scale_out", 4 * layout.storage_words(), -1, device, 4, op);
  }
  a.eps = static_cast<float>(rms_eps);
  a.weight_bias = static_cast<float>(weight_bias);
  a.fp32_acc = fp32_acc;
  a.trigger_at_end = trigger_at_end;
  // 2. and 3. device, stream, plan, launch
  launch_call(op, a, static_cast<int>(pattern), c, table, token_num, hidden, world, rank, control,
              segment_bytes, comm_bytes, claim, record, timeout_s, pdl,
              static_cast<FusionAlgorithm>(algorithm), launcher);
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_fusion_abi, fusedcomm::allreduce_fusion_abi);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_fusion_describe, fusedcomm::allreduce_fusion_describe);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_fusion_workspace_bytes,
                              fusedcomm::allreduce_fusion_workspace_bytes);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_fusion_plan, fusedcomm::allreduce_fusion_plan);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_fusion_control_create,
                              fusedcomm::allreduce_fusion_control_create);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_fusion_control_destroy,
                              fusedcomm::allreduce_fusion_control_destroy);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_fusion_launch, fusedcomm::allreduce_fusion_launch);
