// Lamport buffers: a cell is empty while it holds negative zero of the buffer's element type.
//
// Writers never send -0.0 (they send +0.0 instead), so a reader knows a cell has arrived as
// soon as its bits differ from the sentinel. Compare bits, never floats: -0.0 == +0.0 as floats.
#pragma once
#include <cstdint>

namespace fusedcomm {

// 32-bit word holding the sentinel in every element of `elem_bytes` width (2 or 4).
__host__ __device__ constexpr uint32_t lamport_empty_word(int elem_bytes) {
  return elem_bytes == 2 ? 0x80008000u : 0x80000000u;
}

__device__ __forceinline__ bool lamport_is_empty(uint16_t bits) { return bits == 0x8000u; }
__device__ __forceinline__ bool lamport_is_empty(uint32_t bits) { return bits == 0x80000000u; }

}  // namespace fusedcomm
