// mixed_comm: the fused unicast modes of the mixed-communication family and describe().
//
// The frontend (python/fusedcomm/ops/mixed_comm.py) validates the user's tensors; this entry
// checks again every number that decides where the kernel reads or writes, then fills the args
// and launches on the caller's current stream.
//   mixed_comm_describe() -> op, phases, layout constants
//   mixed_comm_row_bytes(local_size) -> bytes of one rank's row
//   mixed_comm_prepare(device): load the kernels (before any rank's first launch)
//   mixed_comm_launch(x_in, x_out, ws, scatter, two_rounds, tp, dp, grid)
// `ws` = [device, base, row stride, row bytes, local_size, local_rank, claim, record, timeout
// ns]: the rows and their failure state.
#include <cuda_runtime.h>

#include "binding.h"
#include "fusedcomm/kernels/mixed_comm.cuh"

namespace fusedcomm {

namespace {

constexpr int kWsFields = 9;
constexpr int kMixedThreads = 512;

struct Workspace {
  int device;
  MixedCommSite site;
};

Workspace workspace_of(const ffi::Array<int64_t>& ws, const char* op) {
  FC_CHECK_VALUE(ws.size() == kWsFields, op)
      << "internal: workspace record of " << ws.size() << " fields, expected " << kWsFields;
  Workspace w{};
  w.device = static_cast<int>(ws[0]);
  MixedCommSite& s = w.site;
  s.rows.base = reinterpret_cast<uint8_t*>(ws[1]);
  s.rows.stride = ws[2];
  s.world = static_cast<int32_t>(ws[4]);
  s.rank = static_cast<int32_t>(ws[5]);
  FC_CHECK_VALUE(s.world >= 2 && s.world <= MixedCommLayout::kMaxLocal, op)
      << "local_size (" << s.world << ") must be in [2, " << MixedCommLayout::kMaxLocal << "]";
  FC_CHECK_VALUE(s.rank >= 0 && s.rank < s.world, op)
      << "local_rank (" << s.rank << ") must be in [0, " << s.world << ")";
  s.rows.layout = MixedCommLayout{s.world};
  const int64_t need = s.rows.layout.size_per_rank();
  FC_CHECK_VALUE(s.rows.base != nullptr && ws[3] >= need && s.rows.stride >= ws[3], op)
      << "the rows (" << ws[3] << " bytes at stride " << s.rows.stride << ") must hold " << need
      << " bytes";
  FC_CHECK_VALUE(reinterpret_cast<uintptr_t>(s.rows.base) % 128 == 0 && s.rows.stride % 128 == 0,
                 op)
      << "the rows must start at multiples of 128 bytes";
  s.failure.claim = reinterpret_cast<int32_t*>(ws[6]);
  s.failure.record = reinterpret_cast<FailureRecord*>(ws[7]);
  FC_CHECK_VALUE(s.failure.claim != nullptr && s.failure.record != nullptr && ws[8] > 0, op)
      << "internal: the rows have no failure state";
  s.timeout_ns = static_cast<uint64_t>(ws[8]);
  s.op = kOpMixedComm;
  return w;
}

using Kernel = void (*)(MixedCommArgs);

template <typename T>
Kernel pick(bool scatter, bool two_rounds) {
  if (scatter) {
    return two_rounds ? mixed_comm_kernel<T, true, true, kMixedThreads>
                      : mixed_comm_kernel<T, true, false, kMixedThreads>;
  }
  return two_rounds ? mixed_comm_kernel<T, false, true, kMixedThreads>
                    : mixed_comm_kernel<T, false, false, kMixedThreads>;
}

Kernel kernel_for(DType dt, bool scatter, bool two_rounds) {
  return dt == DType::kF16 ? pick<__half>(scatter, two_rounds)
                           : pick<__nv_bfloat16>(scatter, two_rounds);
}

}  // namespace

ffi::Map<ffi::String, ffi::Any> mixed_comm_describe() {
  return describe_family("run_mixed_comm", kOpMixedComm, {"data", "shared"},
                         {{"max_blocks", MixedCommLayout::kMaxBlocks},
                          {"slot_bytes", MixedCommLayout::kSlotBytes},
                          {"max_local", MixedCommLayout::kMaxLocal},
                          {"threads", kMixedThreads}});
}

int64_t mixed_comm_row_bytes(int64_t local_size) {
  FC_CHECK_VALUE(local_size >= 2 && local_size <= MixedCommLayout::kMaxLocal, "MixedCommHandler")
      << "local_size (" << local_size << ") must be in [2, " << MixedCommLayout::kMaxLocal << "]";
  return MixedCommLayout{static_cast<int32_t>(local_size)}.size_per_rank();
}

// Load every kernel on `device` now (lazy loading would otherwise load one at its first launch,
// which may wait for running kernels: those of other ranks sharing the GPU, which wait for it).
void mixed_comm_prepare(int64_t device) {
  constexpr const char* op = "MixedCommHandler";
  DeviceScope scope(static_cast<int>(device), op);
  for (DType dt : {DType::kF16, DType::kBF16}) {
    for (int i = 0; i < 4; ++i) {
      cudaFuncAttributes attributes{};
      FC_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel_for(dt, i & 1, i & 2)), op);
    }
  }
}

void mixed_comm_launch(ffi::TensorView x_in, ffi::TensorView x_out, ffi::Array<int64_t> ws,
                       bool scatter, bool two_rounds, int64_t tp, int64_t dp, int64_t grid) {
  constexpr const char* op = "run_mixed_comm";
  Workspace w = workspace_of(ws, op);
  const DType dt = dtype_of(x_in.dtype());
  FC_CHECK_TYPE(dt == DType::kF16 || dt == DType::kBF16, op)
      << "x_in must be float16 or bfloat16, got " << dtype_name(x_in.dtype());
  FC_CHECK_TYPE(dtype_of(x_out.dtype()) == dt, op) << "x_out must have x_in's dtype";
  FC_CHECK_VALUE(tp >= 1 && dp >= 1 && tp * dp == w.site.world, op)
      << "tp * dp (" << tp << " * " << dp << ") must equal local_size (" << w.site.world << ")";
  FC_CHECK_VALUE(grid >= 1, op) << "grid (" << grid << ") must be >= 1";
  for (const ffi::TensorView* t : {&x_in, &x_out}) {
    FC_CHECK_VALUE(t->device().device_type == kDLCUDA && t->device().device_id == w.device, op)
        << "x_in and x_out must be on the handler's device (cuda:" << w.device << ")";
    FC_CHECK_VALUE(t->IsContiguous() && reinterpret_cast<uintptr_t>(data_of(*t)) % 16 == 0, op)
        << "x_in and x_out must be contiguous and 16-byte aligned";
  }
  const int64_t in_bytes = nbytes(x_in), out_bytes = nbytes(x_out);
  const int64_t block_bytes = scatter ? in_bytes / dp : in_bytes;
  FC_CHECK_VALUE(block_bytes % 16 == 0 && (!scatter || in_bytes % dp == 0), op)
      << "the bytes of x_in (per DP block for the reduce-scatter ops: " << block_bytes
      << ") must be a multiple of 16";
  const int64_t want_out = scatter ? block_bytes : in_bytes * dp;
  FC_CHECK_VALUE(out_bytes == want_out, op)
      << "x_out holds " << out_bytes << " bytes, the op writes " << want_out;
  const auto in0 = reinterpret_cast<uintptr_t>(data_of(x_in));
  const auto out0 = reinterpret_cast<uintptr_t>(data_of(x_out));
  const bool disjoint = in_bytes == 0 || out_bytes == 0 ||
                        in0 + static_cast<uintptr_t>(in_bytes) <= out0 ||
                        out0 + static_cast<uintptr_t>(out_bytes) <= in0;
  FC_CHECK_VALUE(disjoint, op) << "x_out must not overlap x_in";
  const int64_t packs = block_bytes / 16;
  if (packs == 0) return;
  const bool two = MixedCommPlan::two_rounds(two_rounds, static_cast<int>(tp), packs);
  MixedCommArgs a{};
  a.site = w.site;
  a.plan = MixedCommPlan::for_call(packs, static_cast<int>(tp), two, static_cast<int>(grid));
  a.in = static_cast<const uint4*>(data_of(x_in));
  a.out = static_cast<uint4*>(data_of(x_out));
  a.tp = static_cast<int32_t>(tp);
  a.dp = static_cast<int32_t>(dp);

  DeviceScope scope(w.device, op);
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(a.plan.blocks));
  config.blockDim = dim3(kMixedThreads);
  config.stream = stream_for(w.device);
  FC_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel_for(dt, scatter, two), a), op);
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(mixed_comm_describe, fusedcomm::mixed_comm_describe);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mixed_comm_row_bytes, fusedcomm::mixed_comm_row_bytes);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mixed_comm_prepare, fusedcomm::mixed_comm_prepare);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mixed_comm_launch, fusedcomm::mixed_comm_launch);
