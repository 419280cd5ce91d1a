// moe_a2a: the MoE all-to-all entry points (host code; kernels in moe_a2a_kernels.cu).
// The frontend (python/fusedcomm/ops/moe_a2a.py) validates the user's tensors and passes raw
// addresses; these entries check every number that decides where a kernel reads or writes
// (ranks, counts, sizes against the row, alignment), then fill the args and launch.
//   moe_a2a_describe() -> op, phases, limits
//   moe_a2a_dispatch_launch(experts, ws, dropped, num_experts, R,
//                           payloads [ptr, row stride, bytes] * n, eplb ptr, eplb count, pdl)
//   moe_a2a_combine_launch(out, ws, payload (0: in the workspace), top_k, R, region, wire, pdl)
//     wire 1, 2: the low-precision wire from a float16 / bfloat16 payload (0: none)
//   moe_a2a_clear_claim(device, claim): zero a failure claim word (recovery)
// `ws` = [device, base, row stride, row bytes, world, rank, max_num_tokens, eplb experts, claim,
// record, timeout ns(, the round's active rank mask)]. (Sanitize: csrc/moe_a2a_sanitize.cu.)
// Kernels run on the device of the entry's tensor and the caller's current stream (which TVM-FFI
// sets from torch). Sizes are compared by division: nothing overflows.
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>

#include "binding.h"
#include "moe_a2a.h"

namespace fusedcomm {

namespace {

constexpr int kWsFields = 11;

struct Workspace {
  int device;
  int64_t row_bytes;
  MoeA2ASite site;
};

int sm_count(int device, const char* op) {
  static std::mutex mutex;
  static std::unordered_map<int, int> counts;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(device);
  if (it != counts.end()) return it->second;
  int n = 0;
  FC_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), op);
  counts.emplace(device, n);
  return n;
}

Workspace workspace_of(const ffi::Array<int64_t>& ws, const char* op) {
  FC_CHECK_VALUE(ws.size() == kWsFields || ws.size() == kWsFields + 1, op)
      << "internal: workspace record of " << ws.size() << " fields, expected " << kWsFields;
  Workspace w{};
  w.device = static_cast<int>(ws[0]);
  w.row_bytes = ws[3];
  MoeA2ASite& s = w.site;
  s.rows.base = reinterpret_cast<uint8_t*>(ws[1]);
  s.rows.stride = ws[2];
  s.world = static_cast<int32_t>(ws[4]);
  s.rank = static_cast<int32_t>(ws[5]);
  FC_CHECK_VALUE(s.world >= 1 && s.world <= MoeA2ALayout::kMaxKernelRanks, op)
      << "ep_size (" << s.world << ") must be in [1, " << MoeA2ALayout::kMaxKernelRanks
      << "] (the ranks of one node)";
  FC_CHECK_VALUE(s.rank >= 0 && s.rank < s.world, op)
      << "ep_rank (" << s.rank << ") must be in [0, " << s.world << ")";
  FC_CHECK_VALUE(ws[6] >= 1 && ws[6] <= (int64_t{1} << 40) && ws[7] >= 0 && ws[7] <= (1 << 30), op)
      << "internal: bad layout record";
  s.rows.layout = MoeA2ALayout{s.world, ws[6], static_cast<int32_t>(ws[7])};
  FC_CHECK_VALUE(s.rows.base != nullptr && w.row_bytes >= s.rows.layout.payload_data() &&
                     (s.world == 1 || s.rows.stride >= w.row_bytes),
                 op)
      << "the workspace rows (" << w.row_bytes << " bytes at stride " << s.rows.stride
      << ") cannot hold the auxiliary fields (" << s.rows.layout.payload_data() << " bytes)";
  FC_CHECK_VALUE(reinterpret_cast<uintptr_t>(s.rows.base) % 128 == 0 && s.rows.stride % 128 == 0,
                 op)
      << "the workspace rows must start at multiples of 128 bytes";
  s.failure.claim = reinterpret_cast<int32_t*>(ws[8]);
  s.failure.record = reinterpret_cast<FailureRecord*>(ws[9]);
  FC_CHECK_VALUE(s.failure.claim != nullptr && s.failure.record != nullptr && ws[10] > 0, op)
      << "internal: the workspace has no failure state";
  s.timeout_ns = static_cast<uint64_t>(ws[10]);
  s.op = kOpMoeA2A;
  const uint32_t all = static_cast<uint32_t>((uint64_t{1} << s.world) - 1);
  s.active = ws.size() > kWsFields ? static_cast<uint32_t>(ws[kWsFields]) & all : all;
  FC_CHECK_VALUE(s.is_active(s.rank), op) << "active_rank_mask must hold ep_rank " << s.rank;
  return w;
}

bool is_int32(const ffi::TensorView& t) {
  return t.dtype().code == kDLInt && t.dtype().bits == 32 && t.dtype().lanes == 1;
}

void check_on_device(const ffi::TensorView& t, const char* name, int device, const char* op) {
  FC_CHECK_VALUE(t.device().device_type == kDLCUDA && t.device().device_id == device, op)
      << name << " must be on the workspace's device (cuda:" << device << ")";
}

int widest_access(int64_t bytes, int64_t src, int64_t stride, int64_t dst) {
  int width = 16;
  while (width > 1 && (bytes % width || src % width || stride % width || dst % width)) width /= 2;
  return width;
}

}  // namespace

ffi::Map<ffi::String, ffi::Any> moe_a2a_describe() {
  return describe_family("moe_a2a", kOpMoeA2A, {"release", "dispatch", "combine"},
                         {{"max_ranks", MoeA2ALayout::kMaxKernelRanks},
                          {"max_top_k", MoeA2ALayout::kMaxTopK},
                          {"max_payloads", MoeA2ALayout::kMaxPayloads},
                          {"parts", kMoeA2AParts},
                          {"combine_arrivals", MoeA2ALayout{1, 1, 0}.combine_arrivals()},
                          {"release_flags", MoeA2ALayout{1, 1, 0}.release_flags()}});
}

void moe_a2a_dispatch_launch(ffi::TensorView experts, ffi::Array<int64_t> ws, int64_t dropped,
                             int64_t num_experts, int64_t max_tokens, ffi::Array<int64_t> payloads,
                             int64_t eplb_stats, int64_t eplb_count, bool pdl) {
  constexpr const char* op = "moe_a2a_dispatch";
  Workspace w = workspace_of(ws, op);
  check_on_device(experts, "token_selected_experts", w.device, op);
  FC_CHECK_TYPE(is_int32(experts), op) << "token_selected_experts must be int32";
  FC_CHECK_VALUE(experts.ndim() == 2 && experts.IsContiguous(), op)
      << "token_selected_experts must be a contiguous [local tokens, top_k] tensor";
  const int64_t local_tokens = experts.shape()[0], top_k = experts.shape()[1];
  const MoeA2ALayout& l = w.site.rows.layout;
  FC_CHECK_VALUE(top_k >= 1 && top_k <= MoeA2ALayout::kMaxTopK, op)
      << "top_k (" << top_k << ") must be in [1, " << MoeA2ALayout::kMaxTopK << "]";
  FC_CHECK_VALUE(num_experts >= w.site.world && num_experts <= (int64_t{1} << 30), op)
      << "num_experts (" << num_experts << ") must be >= ep_size (" << w.site.world << ")";
  FC_CHECK_VALUE(max_tokens >= 1 && max_tokens <= l.max_num_tokens, op)
      << "runtime_max_tokens_per_rank (" << max_tokens << ") must be in [1, max_num_tokens ("
      << l.max_num_tokens << ")]";
  FC_CHECK_VALUE(local_tokens >= 0 && local_tokens <= max_tokens, op)
      << "the local token count (" << local_tokens << ") must be in [0, "
      << "runtime_max_tokens_per_rank (" << max_tokens << ")]";
  const int64_t n = static_cast<int64_t>(payloads.size()) / 3;
  FC_CHECK_VALUE(payloads.size() % 3 == 0 && n >= 1 && n <= MoeA2ALayout::kMaxPayloads, op)
      << "1 to " << MoeA2ALayout::kMaxPayloads << " payloads, got " << n;

  MoeDispatchArgs a{};
  a.site = w.site;
  a.experts = static_cast<const int32_t*>(data_of(experts));
  a.dropped = reinterpret_cast<unsigned long long*>(dropped);
  FC_CHECK_VALUE(a.dropped != nullptr, op) << "internal: no dropped-id counter";
  a.local_tokens = static_cast<int32_t>(local_tokens);
  a.top_k = static_cast<int32_t>(top_k);
  a.num_experts = static_cast<int32_t>(num_experts);
  a.num_payloads = static_cast<int32_t>(n);
  a.max_tokens = max_tokens;
  FC_CHECK_VALUE(eplb_count >= 0 && eplb_count <= l.eplb_stats_num_experts &&
                     (eplb_count == 0 || (eplb_stats != 0 && eplb_stats % 4 == 0)),
                 op)
      << "eplb_local_stats: " << eplb_count << " entries, the workspace holds "
      << l.eplb_stats_num_experts << " per rank";
  a.eplb_count = static_cast<int32_t>(eplb_count);
  a.eplb_stats = reinterpret_cast<const int32_t*>(eplb_stats);
  MoeA2ARound round{l, max_tokens, a.num_payloads, {}};
  int64_t room = w.row_bytes - l.payload_data();  // >= 0 (workspace_of)
  for (int i = 0; i < n; ++i) {
    const int64_t ptr = payloads[3 * i], stride = payloads[3 * i + 1], bytes = payloads[3 * i + 2];
    FC_CHECK_VALUE(bytes >= 1 && stride >= bytes && (local_tokens == 0 || ptr != 0), op)
        << "payload " << i << ": rows of " << bytes << " bytes at stride " << stride;
    FC_CHECK_VALUE(bytes <= room / round.slots(), op)
        << "the workspace row (" << w.row_bytes << " bytes) cannot hold this round's dispatch "
        << "payloads: payload " << i << " needs " << round.slots() << " slots of " << bytes
        << " bytes after the " << (w.row_bytes - room) << " bytes before it";
    room -= round.slots() * bytes;
    round.payload_bytes[i] = bytes;
  }
  const int64_t end = round.dispatch_end();
  FC_CHECK_VALUE(end <= w.row_bytes, op)
      << "the workspace row (" << w.row_bytes << " bytes) cannot hold this round's dispatch "
      << "payloads: they end at byte " << end << " (payload data at " << l.payload_data()
      << ", then " << round.slots() << " slots of each payload)";
  for (int i = 0; i < n; ++i) {
    const int64_t dst = round.dispatch_payload(i);
    a.src[i] = reinterpret_cast<const uint8_t*>(payloads[3 * i]);
    a.src_stride[i] = payloads[3 * i + 1];
    a.bytes[i] = payloads[3 * i + 2];
    a.dst[i] = dst;
    a.width[i] = widest_access(a.bytes[i], payloads[3 * i], a.src_stride[i], dst);
  }
  DeviceScope scope(w.device, op);
  const int want = static_cast<int>(local_tokens < 1 ? 1 : local_tokens);
  FC_CUDA_CHECK(launch_moe_dispatch(a, want, sm_count(w.device, op), pdl, stream_for(w.device)),
                op);
}

void moe_a2a_combine_launch(ffi::TensorView out, ffi::Array<int64_t> ws, int64_t payload,
                            int64_t top_k, int64_t max_tokens, int64_t region, int64_t wire,
                            bool pdl) {
  constexpr const char* op = "moe_a2a_combine";
  Workspace w = workspace_of(ws, op);
  check_on_device(out, "the output", w.device, op);
  FC_CHECK_VALUE(out.ndim() == 2 && out.IsContiguous(), op)
      << "the output must be a contiguous [local_num_tokens, hidden] tensor";
  const DType dt = dtype_of(out.dtype());
  FC_CHECK_TYPE(dt != DType::kOther, op)
      << "the combine payload must be float16, bfloat16 or float32, got "
      << dtype_name(out.dtype());
  const int64_t local_tokens = out.shape()[0];
  const int64_t row_bytes = out.shape()[1] * (out.dtype().bits / 8);
  const int64_t dtype = dt == DType::kF16 ? 0 : dt == DType::kBF16 ? 1 : 2;
  FC_CHECK_VALUE(!wire || (dtype == 1 && row_bytes % 64 == 0 && row_bytes <= 32768), op)
      << "use_low_precision: hidden (" << row_bytes / 2 << ") must be a multiple of 32, <= 16384";
  const MoeA2ALayout& l = w.site.rows.layout;
  FC_CHECK_VALUE(top_k >= 1 && top_k <= MoeA2ALayout::kMaxTopK, op)
      << "top_k (" << top_k << ") must be in [1, " << MoeA2ALayout::kMaxTopK << "]";
  FC_CHECK_VALUE(max_tokens >= 1 && max_tokens <= l.max_num_tokens, op)
      << "runtime_max_tokens_per_rank (" << max_tokens << ") must be in [1, max_num_tokens ("
      << l.max_num_tokens << ")]";
  FC_CHECK_VALUE(local_tokens >= 0 && local_tokens <= max_tokens, op)
      << "local_num_tokens (" << local_tokens << ") must be in [0, " << max_tokens << "]";
  FC_CHECK_VALUE(row_bytes >= 16 && row_bytes % 16 == 0, op)
      << "a combine row (" << row_bytes << " bytes) must be a positive multiple of 16 bytes";
  const int64_t slots = int64_t{w.site.world} * max_tokens;
  FC_CHECK_VALUE(region >= l.payload_data() && region % 16 == 0 && region <= w.row_bytes &&
                     row_bytes <= (w.row_bytes - region) / slots,
                 op)
      << "the combine region at " << region << " (" << slots << " rows of " << row_bytes
      << " bytes) does not fit the workspace row (" << w.row_bytes << " bytes, payload data from "
      << l.payload_data() << ")";
  const int64_t region_bytes = slots * row_bytes;
  if (payload != 0) {  // push: the rows are read while peers write every row's combine region
    const uintptr_t lo = static_cast<uintptr_t>(payload);
    const uintptr_t hi = lo + static_cast<uintptr_t>(region_bytes);
    for (int q = 0; q < w.site.world; ++q) {
      const uintptr_t start =
          reinterpret_cast<uintptr_t>(w.site.rows.base) + q * w.site.rows.stride + region;
      FC_CHECK_VALUE(hi <= start || lo >= start + region_bytes, op)
          << "the payload overlaps the combine region of rank " << q
          << "'s row, which the peers write during the combine: pass payload_in_workspace=True "
          << "for a payload in the own combine region, or a separate tensor";
    }
  }
  FC_CHECK_VALUE(reinterpret_cast<uintptr_t>(data_of(out)) % 16 == 0 && payload % 16 == 0, op)
      << "the output and the payload must be 16-byte aligned";
  MoeCombineArgs a{};
  a.site = w.site;
  a.payload = reinterpret_cast<const uint8_t*>(payload);
  a.out = static_cast<uint8_t*>(data_of(out));
  a.local_tokens = static_cast<int32_t>(local_tokens);
  a.top_k = static_cast<int32_t>(top_k);
  a.max_tokens = max_tokens;
  a.row_bytes = row_bytes;
  a.region = region;
  DeviceScope scope(w.device, op);
  const int sms = sm_count(w.device, op);
  int64_t want = local_tokens;
  if (payload != 0) want = std::max<int64_t>(want, int64_t{w.site.world} * max_tokens);
  want = std::max<int64_t>(1, std::min<int64_t>(want, int64_t{sms} * 8));
  cudaStream_t stream = stream_for(w.device);
  const int blocks = static_cast<int>(want);
  auto launch = dtype == 0   ? launch_moe_combine<CombineDType::kF16>
                : dtype == 1 ? launch_moe_combine<CombineDType::kBF16>
                             : launch_moe_combine<CombineDType::kF32>;
  if (wire) launch = wire == 2 ? launch_moe_combine_wire<true> : launch_moe_combine_wire<false>;
  FC_CUDA_CHECK(launch(a, blocks, sms, pdl, stream), op);
}

void moe_a2a_clear_claim(int64_t device, int64_t claim) {
  constexpr const char* op = "moe_a2a_initialize";
  FC_CHECK_VALUE(device >= 0 && claim != 0, op) << "internal: no failure claim to clear";
  DeviceScope scope(static_cast<int>(device), op);
  FC_CUDA_CHECK(cudaDeviceSynchronize(), op);  // no kernel of the failed round still runs
  // The caller synchronises the device again before any launch (moe_a2a_initialize).
  FC_CUDA_CHECK(cudaMemset(reinterpret_cast<void*>(claim), 0, sizeof(int32_t)), op);
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_a2a_describe, fusedcomm::moe_a2a_describe);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_a2a_dispatch_launch, fusedcomm::moe_a2a_dispatch_launch);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_a2a_combine_launch, fusedcomm::moe_a2a_combine_launch);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_a2a_clear_claim, fusedcomm::moe_a2a_clear_claim);
