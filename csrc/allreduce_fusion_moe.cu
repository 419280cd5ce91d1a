// allreduce_fusion (control module), the MoE entry: patterns 6 (MoE reduction) and 7 (MoE
// finalize). Host code only. Each rank's row comes from a prologue (proto/moe_input.cuh)
// instead of an input tensor; the all-reduce runs one-shot; norm_out is written, the other
// outputs when given (NVFP4 of the norm when quant_out is given).
//   allreduce_fusion_moe_launch(...): validate, device + stream, build FusionArgs and launch
#include "allreduce_fusion_call.h"

namespace fusedcomm {

namespace {
bool same_dtype(const ffi::TensorView& a, const ffi::TensorView& b) {
  return a.dtype().code == b.dtype().code && a.dtype().bits == b.dtype().bits &&
         a.dtype().lanes == b.dtype().lanes;
}
}  // namespace

void allreduce_fusion_moe_launch(
    int64_t pattern, ffi::TensorView table, int64_t token_num, int64_t hidden, int64_t world,
    int64_t rank, int64_t control, int64_t segment_bytes, int64_t claim, int64_t record,
    double timeout_s, bool pdl, ffi::TensorView residual_in, ffi::TensorView rms_gamma,
    ffi::TensorView norm_out, double rms_eps, double weight_bias, OptTensor residual_out,
    OptTensor allreduce_out, OptTensor quant_out, OptTensor scale_out, double global_scale,
    int64_t sf_layout, int64_t num_experts, OptTensor scale_input, OptTensor experts,
    OptTensor token_input, OptTensor permuted, OptTensor idx, OptTensor expert_scale,
    OptTensor shared, double routed_scaling, int64_t top_k, int64_t launcher) {
  constexpr const char* op = "moe_allreduce_fusion";
  // 1. validate
  const PatternStages st = stages_of(static_cast<int>(pattern));
  FC_CHECK_VALUE(st.pattern == pattern && st.input != Input::kRows, op)
      << "pattern (" << pattern << ") is not a MoE fusion (6 or 7)";
  const CallShape c = check_call_shape(op, residual_in, "residual_in", table, token_num, hidden,
                                       world, rank, control, claim, record, launcher, timeout_s);
  FC_CHECK_TYPE(c.elem == 2, op) << "the MoE fusions take float16 or bfloat16 activations";
  const int64_t numel = token_num * hidden, elem = c.elem;
  const int device = c.device;
  FusionArgs a{};
  a.residual_in = rows_of(residual_in, "residual_in", numel, elem, device, true, op);
  a.gamma = rows_of(rms_gamma, "rms_gamma", hidden, elem, device, true, op);
  a.norm_out = rows_of(norm_out, "norm_out", numel, elem, device, true, op);
  a.residual_out = rows_of(residual_out, "residual_out", numel, elem, device, false, op);
  a.allreduce_out = rows_of(allreduce_out, "allreduce_out", numel, elem, device, false, op);
  if (quant_out.has_value()) {
    nvfp4_outputs(a, op, quant_out, scale_out, sf_layout, c, token_num, hidden);
    FC_CHECK_VALUE(std::isfinite(global_scale), op)
        << "scale_factor (" << global_scale << ") must be finite";
    a.global_scale = static_cast<float>(global_scale);
  }
  if (st.input == Input::kMoeReduction) {
    FC_CHECK_VALUE(num_experts >= 1, op)
        << "moe_reduction_device_num_experts (" << num_experts << ") must be >= 1";
    FC_CHECK_TYPE(scale_input.has_value() && scale_input.value().dtype().code == kDLFloat &&
                      scale_input.value().dtype().bits == 32,
                  op)
        << "moe_reduction_scale_input must be float32";
    FC_CHECK_TYPE(experts.has_value() && same_dtype(experts.value(), residual_in) &&
                      token_input.has_value() && same_dtype(token_input.value(), residual_in),
                  op)
        << "the MoE activations must have residual_in's dtype";
    MoeReductionInput& m = a.moe_reduction;
    m.num_experts = static_cast<int32_t>(num_experts);
    m.experts = rows_of(experts, "moe_reduction_active_experts_token_input", num_experts * numel,
                        elem, device, true, op);
    m.scales = static_cast<const float*>(rows_of(scale_input, "moe_reduction_scale_input",
                                                 num_experts * token_num, 4, device, true, op, 4));
    m.token_input =
        rows_of(token_input, "moe_reduction_token_input", numel, elem, device, true, op);
  } else {
    FC_CHECK_VALUE(top_k >= 1, op) << "top_k (" << top_k << ") must be >= 1";
    FC_CHECK_VALUE(permuted.has_value(), op) << "allreduce_in is required";
    const ffi::TensorView& p = permuted.value();
    FC_CHECK_VALUE(p.numel() % hidden == 0, op)
        << "allreduce_in has " << p.numel() << " elements, not rows of hidden_dim (" << hidden
        << ")";
    FC_CHECK_TYPE(
        idx.has_value() && idx.value().dtype().code == kDLInt && idx.value().dtype().bits == 32, op)
        << "expanded_idx_to_permuted_idx must be int32";
    FC_CHECK_TYPE(same_dtype(p, residual_in) &&
                      (!expert_scale.has_value() || same_dtype(expert_scale.value(), residual_in)),
                  op)
        << "allreduce_in and expert_scale_factor must have residual_in's dtype";
    MoeFinalizeInput& m = a.moe_finalize;
    m.rows = p.numel() / hidden;
    m.top_k = static_cast<int32_t>(top_k);
    m.routed_scaling = static_cast<float>(routed_scaling);
    m.permuted = rows_of(permuted, "allreduce_in", p.numel(), elem, device, true, op);
    m.idx = static_cast<const int32_t*>(
        rows_of(idx, "expanded_idx_to_permuted_idx", token_num * top_k, 4, device, true, op, 4));
    m.expert_scale = rows_of(expert_scale, "expert_scale_factor", token_num * top_k, elem, device,
                             false, op, elem);
    m.shared = rows_of(shared, "shared_expert_output", numel, elem, device, false, op);
  }
  a.eps = static_cast<float>(rms_eps);
  a.weight_bias = static_cast<float>(weight_bias);
  // always the fixed rank-order sum in fp32 (the other patterns keep it in T unless the
  // caller asks for fp32_acc)
  a.fp32_acc = true;
  a.trigger_at_end = true;
  // 2. and 3. device, stream, plan, launch
  launch_call(op, a, static_cast<int>(pattern), c, table, token_num, hidden, world, rank, control,
              segment_bytes, /*comm_bytes=*/0, claim, record, timeout_s, pdl, kFusionOneshot,
              launcher, /*oneshot_only=*/true);
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(allreduce_fusion_moe_launch, fusedcomm::allreduce_fusion_moe_launch);
