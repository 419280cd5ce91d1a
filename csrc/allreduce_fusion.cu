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
#include "binding.h"

namespace fusedcomm {

namespace {
constexpr int64_t kMaxRowBytes = int64_t{kFusionMaxPacks} * kFusionMaxThreads * 16;
using OptTensor = ffi::Optional<ffi::TensorView>;

bool supported_pattern(int64_t p) { return stages_of(static_cast<int>(p)).pattern == p; }
}  // namespace

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

namespace {
// The data pointer of an optional [token_num, hidden]-shaped (numel-checked) tensor.
// `align`: 0 = what the kernels' 16-byte packs need; scalars per row (scales) pass 4.
void* rows_of(const OptTensor& t, const char* name, int64_t numel, int64_t elem_bytes, int device,
              bool required, const char* op, int64_t align = 0) {
  if (!t.has_value()) {
    FC_CHECK_VALUE(!required, op) << name << " is required by this pattern";
    return nullptr;
  }
  const ffi::TensorView& v = t.value();
  FC_CHECK_VALUE(v.device().device_type == kDLCUDA && v.device().device_id == device, op)
      << name << " must be on cuda:" << device;
  FC_CHECK_VALUE(v.is_contiguous(), op) << name << " must be contiguous";
  FC_CHECK_VALUE(v.numel() == numel, op)
      << name << " has " << v.numel() << " elements, expected " << numel;
  FC_CHECK_TYPE((v.dtype().bits * v.dtype().lanes) / 8 == elem_bytes, op)
      << name << " has " << v.dtype().bits << "-bit elements, expected " << 8 * elem_bytes;
  void* p = data_of(v);
  if (align == 0) align = elem_bytes == 1 ? 16 / 2 : 16;  // e4m3: 8 bytes per pack of 16-bit T
  FC_CHECK_VALUE(reinterpret_cast<uintptr_t>(p) % align == 0, op)
      << name << " must be " << align << "-byte aligned";
  return p;
}
// The data pointer of an optional tensor read as raw bytes (any dtype): `min_bytes` <= its size
// <= `max_bytes` (-1: no upper bound), `align`-byte aligned.
void* bytes_of(const OptTensor& t, const char* name, int64_t min_bytes, int64_t max_bytes,
               int device, int64_t align, const char* op) {
  FC_CHECK_VALUE(t.has_value(), op) << name << " is required by this pattern";
  const ffi::TensorView& v = t.value();
  FC_CHECK_VALUE(v.device().device_type == kDLCUDA && v.device().device_id == device, op)
      << name << " must be on cuda:" << device;
  FC_CHECK_VALUE(v.is_contiguous(), op) << name << " must be contiguous";
  const int64_t bytes = v.numel() * ((v.dtype().bits * v.dtype().lanes) / 8);
  FC_CHECK_VALUE(bytes >= min_bytes && (max_bytes < 0 || bytes <= max_bytes), op)
      << name << " holds " << bytes << " bytes, expected "
      << (max_bytes == min_bytes ? "" : "at least ") << min_bytes;
  void* p = data_of(v);
  FC_CHECK_VALUE(reinterpret_cast<uintptr_t>(p) % align == 0, op)
      << name << " must be " << align << "-byte aligned";
  return p;
}
}  // namespace

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
  FC_CHECK_VALUE(supported_pattern(pattern), op) << "pattern (" << pattern << ") has no kernel";
  const DType dt = dtype_of(input.dtype());
  FC_CHECK_TYPE(dt != DType::kOther, op)
      << "dtype " << dtype_name(input.dtype()) << " is not supported (float32, float16, bfloat16)";
  const int64_t elem = dt == DType::kF32 ? 4 : 2;
  FC_CHECK_VALUE(input.device().device_type == kDLCUDA, op) << "allreduce_in must be a CUDA tensor";
  const int device = input.device().device_id;
  const int64_t numel = token_num * hidden;
  void* in = rows_of(input, "allreduce_in", numel, elem, device, true, op);
  FC_CHECK_VALUE(world >= 2 && world <= kMaxRanks, op)
      << "world_size (" << world << ") must be in [2, " << kMaxRanks << "]";
  FC_CHECK_VALUE(rank >= 0 && rank < world, op)
      << "world_rank (" << rank << ") must be in [0, " << world << ")";
  FC_CHECK_VALUE(table.device().device_type == kDLCUDA && table.device().device_id == device &&
                     table.dtype().code == kDLInt && table.dtype().bits == 64 &&
                     table.numel() == 3 * world + 1 && table.is_contiguous(),
                 op)
      << "workspace_ptrs must be the int64 pointer table of 3 * world_size + 1 entries on cuda:"
      << device;
  FC_CHECK_VALUE(control != 0 && claim != 0 && record != 0 && launcher != 0, op)
      << "no control block, failure state or kernel launcher given";
  FC_CHECK_VALUE(std::isfinite(timeout_s) && timeout_s > 0, op)
      << "timeout_s (" << timeout_s << ") must be > 0";
  const PatternStages st = stages_of(static_cast<int>(pattern));
  const bool fp8 =
      st.quant == Quant::kStatic || st.quant == Quant::kDynamic || st.quant == Quant::kGroupFp8;
  FusionArgs a{};
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
    FC_CHECK_TYPE(elem == 2, op) << "NVFP4 patterns take float16 or bfloat16 input";
    FC_CHECK_VALUE(hidden % 16 == 0, op)
        << "hidden_dim (" << hidden << ") must be a multiple of 16";
    FC_CHECK_VALUE(sf_layout >= kSfSwizzled128x4 && sf_layout <= kSfLinear, op)
        << "layout_code (" << sf_layout << ") must be 0, 1 or 2";
    const SfLayout layout{static_cast<int32_t>(sf_layout), static_cast<int32_t>(hidden / 16)};
    a.sf_layout = static_cast<int32_t>(sf_layout);
    a.quant_out = bytes_of(quant_out, "quant_out", numel / 2, numel / 2, device, 4, op);
    a.scale_out = bytes_of(scale_out, "scale_out", layout.bytes(token_num), -1, device, 1, op);
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
  // 2. device and stream
  DeviceScope scope(device, op);
  cudaStream_t stream = stream_for(device);
  // 3. args and launch
  const FusionPlan plan =
      plan_fusion(token_num, hidden, static_cast<int>(elem), static_cast<int>(world), segment_bytes,
                  static_cast<FusionAlgorithm>(algorithm));
  FC_CHECK_VALUE(plan.algorithm != kFusionTwoshot || 2 * numel * elem <= comm_bytes, op)
      << "the call (" << token_num << " x " << hidden << " of " << 8 * elem
      << "-bit elements) needs " << 2 * numel * elem << " bytes of two-shot buffer; the workspace "
      << "has " << comm_bytes << " (create it for at least this many tokens and this dtype)";
  a.table = static_cast<const int64_t*>(data_of(table));
  a.control = reinterpret_cast<FusionControl*>(control);
  a.input = in;
  a.token_num = token_num;
  a.segment_bytes = segment_bytes;
  a.row_packs = static_cast<int32_t>(hidden * elem / 16);
  a.hidden = static_cast<int32_t>(hidden);
  a.eps = static_cast<float>(rms_eps);
  a.weight_bias = static_cast<float>(weight_bias);
  a.failure.claim = reinterpret_cast<int32_t*>(claim);
  a.failure.record = reinterpret_cast<FailureRecord*>(record);
  a.timeout_ns = timeout_s >= 1e9 ? uint64_t(1e18) : static_cast<uint64_t>(timeout_s * 1e9);
  a.rank = static_cast<int32_t>(rank);
  a.world = static_cast<int32_t>(world);
  a.fp32_acc = fp32_acc;
  a.trigger_at_end = trigger_at_end;
  FC_CUDA_CHECK(
      reinterpret_cast<FusionLauncher>(launcher)(a, plan, static_cast<int>(pattern), pdl, stream),
      op);
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
