// The launch entries of the Lamport family (allreduce_fusion.cu, allreduce_fusion_moe.cu),
// host side: the checks every entry makes and the common end of a launch. Host code only.
//   check_call_shape   the frame of a call: dtype and device of its rows, world, rank, table,
//                      control block, failure state, launcher, timeout
//   rows_of / bytes_of the data pointer of an argument, checked (rows of T, or raw bytes)
//   nvfp4_outputs      quant_out and scale_out of the NVFP4 epilogue
//   launch_call        device + stream, plan (with the workspace's capacity), the fields every
//                      call shares, launch
#pragma once
#include <tvm/ffi/optional.h>

#include <cmath>

#include "allreduce_fusion.h"
#include "binding.h"

namespace fusedcomm {

constexpr int64_t kMaxRowBytes = int64_t{kFusionMaxPacks} * kFusionMaxThreads * 16;
using OptTensor = ffi::Optional<ffi::TensorView>;

struct CallShape {
  int device;
  int64_t elem;  // bytes per element of T
};

inline CallShape check_call_shape(const char* op, const ffi::TensorView& rows, const char* name,
                                  const ffi::TensorView& table, int64_t token_num, int64_t hidden,
                                  int64_t world, int64_t rank, int64_t control, int64_t claim,
                                  int64_t record, int64_t launcher, double timeout_s) {
  const DType dt = dtype_of(rows.dtype());
  FC_CHECK_TYPE(dt != DType::kOther, op)
      << "dtype " << dtype_name(rows.dtype()) << " is not supported (float32, float16, bfloat16)";
  FC_CHECK_VALUE(rows.device().device_type == kDLCUDA, op) << name << " must be a CUDA tensor";
  const int device = rows.device().device_id;
  const int64_t elem = dt == DType::kF32 ? 4 : 2;
  FC_CHECK_VALUE(
      token_num >= 1 && hidden >= 1 && hidden * elem % 16 == 0 && hidden * elem <= kMaxRowBytes, op)
      << "token_num (" << token_num << ") must be >= 1 and hidden_dim (" << hidden
      << ") a positive multiple of " << 16 / elem << " up to " << kMaxRowBytes / elem;
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
  return CallShape{device, elem};
}

// The data pointer of an optional tensor of `numel` elements of `elem_bytes` (numel-checked,
// contiguous, on `device`). `align`: 0 = what the kernels' 16-byte packs need; scalars per row
// (scales) pass 4.
inline void* rows_of(const OptTensor& t, const char* name, int64_t numel, int64_t elem_bytes,
                     int device, bool required, const char* op, int64_t align = 0) {
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

// The data pointer of a required tensor read as raw bytes (any dtype): `min_bytes` <= its size
// <= `max_bytes` (-1: no upper bound), `align`-byte aligned.
inline void* bytes_of(const OptTensor& t, const char* name, int64_t min_bytes, int64_t max_bytes,
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

inline void nvfp4_outputs(FusionArgs& a, const char* op, const OptTensor& quant_out,
                          const OptTensor& scale_out, int64_t sf_layout, const CallShape& c,
                          int64_t token_num, int64_t hidden) {
  FC_CHECK_TYPE(c.elem == 2, op) << "NVFP4 takes float16 or bfloat16 activations";
  FC_CHECK_VALUE(hidden % 16 == 0, op) << "hidden_dim (" << hidden << ") must be a multiple of 16";
  FC_CHECK_VALUE(sf_layout >= kSfSwizzled128x4 && sf_layout <= kSfLinear, op)
      << "layout_code (" << sf_layout << ") must be 0, 1 or 2";
  const SfLayout layout{static_cast<int32_t>(sf_layout), static_cast<int32_t>(hidden / 16)};
  const int64_t codes = token_num * hidden / 2;
  a.sf_layout = static_cast<int32_t>(sf_layout);
  a.quant_out = bytes_of(quant_out, "quant_out", codes, codes, c.device, 4, op);
  a.scale_out = bytes_of(scale_out, "scale_out", layout.bytes(token_num), -1, c.device, 1, op);
}

// Blocks per token of a MoE call: up to 8 while the call has few tokens (a block per token
// alone would read every expert row of its token), never more than the row has packs.
inline int moe_split(int64_t token_num, int64_t row_packs) {
  int64_t split = token_num >= 64 ? 1 : 64 / token_num;
  if (split > 8) split = 8;
  if (split > row_packs) split = row_packs;
  return static_cast<int>(split < 1 ? 1 : split);
}

// Fills the fields every call shares and launches on the current stream. A one-shot plan must
// fit the Lamport segment (the planner falls back to two-shot otherwise), a two-shot plan the
// comm buffer; `oneshot_only` patterns refuse the fallback.
inline void launch_call(const char* op, FusionArgs& a, int pattern, const CallShape& c,
                        const ffi::TensorView& table, int64_t token_num, int64_t hidden,
                        int64_t world, int64_t rank, int64_t control, int64_t segment_bytes,
                        int64_t comm_bytes, int64_t claim, int64_t record, double timeout_s,
                        bool pdl, FusionAlgorithm algorithm, int64_t launcher,
                        bool oneshot_only = false) {
  DeviceScope scope(c.device, op);
  cudaStream_t stream = stream_for(c.device);
  FusionPlan plan = plan_fusion(token_num, hidden, static_cast<int>(c.elem),
                                static_cast<int>(world), segment_bytes, algorithm);
  a.moe_split = 1;
  if (oneshot_only) {  // the MoE prologue reads many rows per token: spread it over blocks
    a.moe_split = moe_split(token_num, hidden * c.elem / 16);
    plan.blocks = static_cast<int>(token_num * a.moe_split);
  }
  const int64_t bytes = token_num * hidden * c.elem;
  FC_CHECK_VALUE(!oneshot_only || plan.algorithm == kFusionOneshot, op)
      << "the call (" << token_num << " x " << hidden << ") needs " << world * bytes
      << " bytes of Lamport segment and runs one-shot only; the workspace's segment holds "
      << segment_bytes;
  FC_CHECK_VALUE(plan.algorithm != kFusionTwoshot || 2 * bytes <= comm_bytes, op)
      << "the call (" << token_num << " x " << hidden << " of " << 8 * c.elem
      << "-bit elements) needs " << 2 * bytes << " bytes of two-shot buffer; the workspace "
      << "has " << comm_bytes << " (create it for at least this many tokens and this dtype)";
  a.table = static_cast<const int64_t*>(data_of(table));
  a.control = reinterpret_cast<FusionControl*>(control);
  a.token_num = token_num;
  a.segment_bytes = segment_bytes;
  a.row_packs = static_cast<int32_t>(hidden * c.elem / 16);
  a.hidden = static_cast<int32_t>(hidden);
  a.failure.claim = reinterpret_cast<int32_t*>(claim);
  a.failure.record = reinterpret_cast<FailureRecord*>(record);
  a.timeout_ns = timeout_s >= 1e9 ? uint64_t(1e18) : static_cast<uint64_t>(timeout_s * 1e9);
  a.rank = static_cast<int32_t>(rank);
  a.world = static_cast<int32_t>(world);
  FC_CUDA_CHECK(reinterpret_cast<FusionLauncher>(launcher)(a, plan, pattern, pdl, stream), op);
}

}  // namespace fusedcomm
