// moe_a2a_sanitize: the host entry of moe_a2a_sanitize_expert_ids (its kernel: part 0 of
// csrc/moe_a2a_kernels.cu).
//   moe_a2a_sanitize_launch(ids, recv_counts, invalid_id, pdl)
// `ids`: the received expert ids [ep_size, R, top_k] (int32, any strides, on the device);
// `recv_counts`: the address of the own row's recv counters (an excluded source's is 0: the
// dispatch wrote it). Launches on the current stream of the ids' device.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>

#include "binding.h"
#include "moe_a2a.h"

namespace fusedcomm {

void moe_a2a_sanitize_launch(ffi::TensorView ids, int64_t recv_counts, int64_t invalid_id,
                             bool pdl) {
  constexpr const char* op = "moe_a2a_sanitize_expert_ids";
  FC_CHECK_TYPE(ids.dtype().code == kDLInt && ids.dtype().bits == 32 && ids.dtype().lanes == 1, op)
      << "expert_ids must be int32";
  FC_CHECK_VALUE(ids.ndim() == 3 && recv_counts != 0, op)
      << "expert_ids must be an [ep_size, R, top_k] tensor";
  const int64_t world = ids.shape()[0], max_tokens = ids.shape()[1], top_k = ids.shape()[2];
  const int device = ids.device().device_id;
  FC_CHECK_VALUE(invalid_id >= INT32_MIN && invalid_id <= INT32_MAX, op)
      << "invalid_expert_id (" << invalid_id << ") must fit int32";
  MoeSanitizeArgs a{};
  a.recv_counts = reinterpret_cast<const int32_t*>(recv_counts);
  a.ids = static_cast<int32_t*>(data_of(ids));
  a.stride_src = ids.strides()[0];
  a.stride_slot = ids.strides()[1];
  a.stride_k = ids.strides()[2];
  a.world = static_cast<int32_t>(world);
  a.top_k = static_cast<int32_t>(top_k);
  a.max_tokens = max_tokens;
  a.invalid_id = static_cast<int32_t>(invalid_id);
  const int64_t n = world * max_tokens * top_k;
  if (n == 0) return;
  DeviceScope scope(device, op);
  int sms = 0;
  FC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), op);
  const int64_t cap = int64_t{sms} * 4;
  const int64_t blocks = std::min<int64_t>(cap, (n + kMoeA2AThreads - 1) / kMoeA2AThreads);
  FC_CUDA_CHECK(launch_moe_sanitize(a, static_cast<int>(blocks), pdl, stream_for(device)), op);
}

}  // namespace fusedcomm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_a2a_sanitize_launch, fusedcomm::moe_a2a_sanitize_launch);
