// dcp_a2a: the decode context-parallel all-to-all entry point and describe().
//
// The frontend (python/fusedcomm/ops/dcp_a2a.py) validates the user's tensors (with errors that
// are also RuntimeErrors); this entry checks again every number that decides where the kernel
// reads or writes, then fills the args and launches on the caller's current stream.
//   dcp_a2a_describe() -> op, phases, limits
//   dcp_a2a_prepare(device): load the kernel (before any rank's first launch)
//   dcp_a2a_alltoall_launch(partial_o, softmax_stats, partial_o_out, softmax_stats_out, ws, pdl)
// `ws` = [device, base, row stride, row bytes, cp_size, cp_rank, claim, record, timeout ns]:
// the workspace and its failure state.
#include <cuda_runtime.h>

#include "binding.h"
#include "fusedcomm/kernels/dcp_a2a.cuh"

namespace fusedcomm {

namespace {

constexpr int kWsFields = 9;
constexpr int kDcpThreads = 256;  // per block; at least kMaxCpSize (one waiting thread a peer)
static_assert(kDcpThreads >= DcpA2ALayout::kMaxCpSize, "a thread per peer");

struct Workspace {
  int device;
  int64_t row_bytes;
  DcpA2ASite site;
};

Workspace workspace_of(const ffi::Array<int64_t>& ws, const char* op) {
  FC_CHECK_VALUE(ws.size() == kWsFields, op)
      << "internal: workspace record of " << ws.size() << " fields, expected " << kWsFields;
  Workspace w{};
  w.device = static_cast<int>(ws[0]);
  w.row_bytes = ws[3];
  DcpA2ASite& s = w.site;
  s.rows.base = reinterpret_cast<uint8_t*>(ws[1]);
  s.rows.stride = ws[2];
  s.world = static_cast<int32_t>(ws[4]);
  s.rank = static_cast<int32_t>(ws[5]);
  FC_CHECK_VALUE(s.world >= 1 && s.world <= DcpA2ALayout::kMaxCpSize, op)
      << "cp_size (" << s.world << ") must be in [1, " << DcpA2ALayout::kMaxCpSize << "]";
  FC_CHECK_VALUE(s.rank >= 0 && s.rank < s.world, op)
      << "cp_rank (" << s.rank << ") must be in [0, " << s.world << ")";
  s.rows.layout = DcpA2ALayout{s.world};
  const int64_t need = s.rows.layout.size_per_rank();
  FC_CHECK_VALUE(s.rows.base != nullptr && w.row_bytes >= need &&
                     (s.world == 1 || s.rows.stride >= w.row_bytes),
                 op)
      << "the workspace rows (" << w.row_bytes << " bytes at stride " << s.rows.stride
      << ") must hold decode_cp_a2a_workspace_size(" << s.world << ") = " << need << " bytes";
  FC_CHECK_VALUE(reinterpret_cast<uintptr_t>(s.rows.base) % 128 == 0 && s.rows.stride % 128 == 0,
                 op)
      << "the workspace rows must start at multiples of 128 bytes";
  s.failure.claim = reinterpret_cast<int32_t*>(ws[6]);
  s.failure.record = reinterpret_cast<FailureRecord*>(ws[7]);
  FC_CHECK_VALUE(s.failure.claim != nullptr && s.failure.record != nullptr && ws[8] > 0, op)
      << "internal: the workspace has no failure state";
  s.timeout_ns = static_cast<uint64_t>(ws[8]);
  s.op = kOpDcpA2A;
  return w;
}

// A contiguous [..., cp_size, width] tensor on the workspace's device; returns N (the product
// of the leading sizes).
int64_t entries_of(const ffi::TensorView& t, const char* name, const Workspace& w, int64_t width,
                   const char* op) {
  FC_CHECK_VALUE(t.device().device_type == kDLCUDA && t.device().device_id == w.device, op)
      << name << " must be on the workspace's device (cuda:" << w.device << ")";
  FC_CHECK_VALUE(t.ndim() >= 2 && t.IsContiguous(), op)
      << name << " must be a contiguous [..., cp_size, *] tensor";
  FC_CHECK_VALUE(t.shape()[t.ndim() - 2] == w.site.world && t.shape()[t.ndim() - 1] == width, op)
      << name << ": the last two sizes must be (cp_size " << w.site.world << ", " << width << ")";
  int64_t n = 1;
  for (int i = 0; i < t.ndim() - 2; ++i) n *= t.shape()[i];
  return n;
}

}  // namespace

ffi::Map<ffi::String, ffi::Any> dcp_a2a_describe() {
  return describe_family("decode_cp_a2a_alltoall", kOpDcpA2A, {"send", "receive"},
                         {{"channels", DcpA2ALayout::kChannels},
                          {"chunk_bytes", DcpA2ALayout::kChunkBytes},
                          {"max_cp_size", DcpA2ALayout::kMaxCpSize},
                          {"threads", kDcpThreads}});
}

// Load the kernel on `device` now (lazy module loading would otherwise load it at the first
// launch, which may wait for running kernels: those of other ranks sharing the GPU, which wait
// for this one).
void dcp_a2a_prepare(int64_t device) {
  constexpr const char* op = "decode_cp_a2a_init_workspace";
  DeviceScope scope(static_cast<int>(device), op);
  cudaFuncAttributes attributes{};
  FC_CUDA_CHECK(cudaFuncGetAttributes(&attributes, dcp_a2a_alltoall<kDcpThreads>), op);
}

void dcp_a2a_alltoall_launch(ffi::TensorView partial_o, ffi::TensorView stats,
                             ffi::TensorView out_o, ffi::TensorView out_s, ffi::Array<int64_t> ws,
                             bool pdl) {
  constexpr const char* op = "decode_cp_a2a_alltoall";
  Workspace w = workspace_of(ws, op);
  const DType dt = dtype_of(partial_o.dtype());
  FC_CHECK_TYPE(dt == DType::kF16 || dt == DType::kBF16, op)
      << "partial_o must be float16 or bfloat16, got " << dtype_name(partial_o.dtype());
  FC_CHECK_TYPE(dtype_of(stats.dtype()) == DType::kF32, op)
      << "softmax_stats must be float32, got " << dtype_name(stats.dtype());
  FC_CHECK_TYPE(dtype_of(out_o.dtype()) == dt && dtype_of(out_s.dtype()) == DType::kF32, op)
      << "the outputs must have the inputs' dtypes";
  const int64_t dv = partial_o.ndim() >= 1 ? partial_o.shape()[partial_o.ndim() - 1] : 0;
  const int64_t sw = stats.ndim() >= 1 ? stats.shape()[stats.ndim() - 1] : 0;
  const int64_t n = entries_of(partial_o, "partial_o", w, dv, op);
  FC_CHECK_VALUE(entries_of(stats, "softmax_stats", w, sw, op) == n &&
                     entries_of(out_o, "partial_o_out", w, dv, op) == n &&
                     entries_of(out_s, "softmax_stats_out", w, sw, op) == n,
                 op)
      << "softmax_stats and the outputs must have partial_o's leading sizes";
  const int64_t o_bytes = dv * 2, s_bytes = sw * 4;
  FC_CHECK_VALUE(o_bytes >= 16 && o_bytes % 16 == 0 && s_bytes >= 8 && s_bytes % 8 == 0, op)
      << "Dv * 2 (" << o_bytes << ") must be a positive multiple of 16 and S (" << sw
      << ") even and >= 2";
  const DcpA2APlan plan = DcpA2APlan::make(n, o_bytes, s_bytes, w.site.world);
  FC_CHECK_VALUE(n == 0 || plan.per_unit >= 1, op)
      << "one entry (" << o_bytes + s_bytes << " bytes) must fit a chunk ("
      << DcpA2ALayout::kChunkBytes << " bytes)";
  const void* ptrs[4] = {data_of(partial_o), data_of(stats), data_of(out_o), data_of(out_s)};
  const int64_t sizes[4] = {nbytes(partial_o), nbytes(stats), nbytes(out_o), nbytes(out_s)};
  for (int i = 0; i < 4; ++i) {
    FC_CHECK_VALUE(reinterpret_cast<uintptr_t>(ptrs[i]) % 16 == 0, op)
        << "every tensor must start at a multiple of 16 bytes";
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 2; j < 4; ++j) {
      FC_CHECK_VALUE(
          n == 0 || !(reinterpret_cast<uintptr_t>(ptrs[i]) <
                          reinterpret_cast<uintptr_t>(ptrs[j]) + static_cast<uintptr_t>(sizes[j]) &&
                      reinterpret_cast<uintptr_t>(ptrs[j]) <
                          reinterpret_cast<uintptr_t>(ptrs[i]) + static_cast<uintptr_t>(sizes[i])),
          op)
          << "the outputs must not overlap the inputs";
    }
  }
  if (n == 0) return;  // nothing to exchange: no launch, the channels' rounds do not move

  DcpA2AArgs a{};
  a.site = w.site;
  a.plan = plan;
  a.in_o = static_cast<const uint8_t*>(ptrs[0]);
  a.in_s = static_cast<const uint8_t*>(ptrs[1]);
  a.out_o = static_cast<uint8_t*>(const_cast<void*>(ptrs[2]));
  a.out_s = static_cast<uint8_t*>(const_cast<void*>(ptrs[3]));
  a.o_bytes = o_bytes;
  a.s_bytes = s_bytes;

  DeviceScope scope(w.device, op);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(plan.channels));
  config.blockDim = dim3(kDcpThreads);
  config.stream = stream_for(w.device);
  config.attrs = attr;
  config.numAttrs = 1;
  FC_CUDA_CHECK(cudaLaunchKernelEx(&config, dcp_a2a_alltoall<kDcpThreads>, a), op);
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(dcp_a2a_describe, fusedcomm::dcp_a2a_describe);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(dcp_a2a_prepare, fusedcomm::dcp_a2a_prepare);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(dcp_a2a_alltoall_launch, fusedcomm::dcp_a2a_alltoall_launch);
