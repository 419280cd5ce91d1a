// lamport_fill: mark whole 16-byte chunks of a Lamport buffer as empty.
#pragma once
#include "fusedcomm/sync/lamport.cuh"

namespace fusedcomm {

__global__ void lamport_fill(uint4* buffer, int64_t chunks, uint32_t empty_word) {
  const uint4 v = make_uint4(empty_word, empty_word, empty_word, empty_word);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks; i += stride) {
    buffer[i] = v;
  }
}

}  // namespace fusedcomm
