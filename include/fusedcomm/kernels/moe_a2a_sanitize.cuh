// MoE all-to-all sanitize: in the received expert ids [W, R, top_k], every padding slot
// (src, j >= recv_count[src]) gets `invalid_id` in all top_k entries; valid slots stay as they
// are. Local only: no peer is involved. One thread per (slot, k), grid-stride.
#pragma once
#include "fusedcomm/kernels/moe_a2a_args.cuh"
#include "fusedcomm/proto/pdl.cuh"

namespace fusedcomm {

__global__ void moe_a2a_sanitize(MoeSanitizeArgs a) {
  pdl_wait();
  const int64_t per_src = a.max_tokens * a.top_k;
  const int64_t n = a.world * per_src;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t src = i / per_src, j = (i % per_src) / a.top_k, k = i % a.top_k;
    if (j >= a.recv_counts[src]) {
      a.ids[src * a.stride_src + j * a.stride_slot + k * a.stride_k] = a.invalid_id;
    }
  }
  pdl_trigger();
}

}  // namespace fusedcomm
