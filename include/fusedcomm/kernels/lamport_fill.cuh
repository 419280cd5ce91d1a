// lamport_fill: mark exactly `bytes` bytes of a Lamport buffer as empty (negative zero).
//
// Whole 16-byte chunks are written with one store each; a tail shorter than 16 bytes is written
// element by element (elem_bytes wide), so nothing past the end is touched.
#pragma once
#include "fusedcomm/sync/lamport.cuh"

namespace fusedcomm {

__global__ void lamport_fill(void* buffer, int64_t bytes, int elem_bytes) {
  const uint32_t w = lamport_empty_word(elem_bytes);
  const int64_t chunks = bytes / 16;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < chunks; i += stride) {
    reinterpret_cast<uint4*>(buffer)[i] = make_uint4(w, w, w, w);
  }
  const int64_t tail_elems = (bytes - chunks * 16) / elem_bytes;
  if (first < tail_elems) {
    char* tail = static_cast<char*>(buffer) + chunks * 16;
    if (elem_bytes == 2) {
      reinterpret_cast<uint16_t*>(tail)[first] = static_cast<uint16_t>(w);
    } else {
      reinterpret_cast<uint32_t*>(tail)[first] = w;
    }
  }
}

}  // namespace fusedcomm
