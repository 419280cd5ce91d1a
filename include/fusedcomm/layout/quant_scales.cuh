// Where block-quantisation scales go: one layout object per scale buffer (reference:
// python/fusedcomm/reference/quant.py).
//
//   SfLayout         NVFP4 scale byte (row m, block column k), K = hidden / 16 columns,
//                    Kt = ceil(K / 4):
//                      LINEAR          m*K + k
//                      SWIZZLED_128x4  (m/128)*Kt*512 + (k/4)*512 + (m%32)*16
//                                      + ((m%128)/32)*4 + k%4
//                      SWIZZLED_8x4    (m/8)*Kt*32 + (k/4)*32 + (m%8)*4 + k%4
//                    The swizzled layouts pad rows and columns to whole tiles; padding is never
//                    written.
//   PackedUe8m0      per-token-group FP8 exponents, four per int32: group k of row t is byte
//                    k%4 of word (k/4)*M + t, M = round_up(rows, 4) (column-major, padded);
//                    storage = rows + (packs - 1) * M words.
// The host checks buffer sizes with the same objects (csrc/allreduce_fusion.cu).
#pragma once
#include <cstdint>

namespace fusedcomm {

enum SfLayoutCode : int32_t { kSfSwizzled128x4 = 0, kSfSwizzled8x4 = 1, kSfLinear = 2 };

struct SfLayout {
  int32_t code;     // SfLayoutCode
  int32_t columns;  // K: scale factors per row

  __host__ __device__ constexpr int64_t tiles_across() const { return (columns + 3) / 4; }

  __host__ __device__ constexpr int64_t offset(int64_t m, int64_t k) const {
    if (code == kSfLinear) return m * columns + k;
    if (code == kSfSwizzled8x4)
      return (m / 8) * tiles_across() * 32 + (k / 4) * 32 + (m % 8) * 4 + k % 4;
    return (m / 128) * tiles_across() * 512 + (k / 4) * 512 + (m % 32) * 16 + ((m % 128) / 32) * 4 +
           k % 4;
  }

  // Bytes a buffer of `rows` rows needs.
  __host__ __device__ constexpr int64_t bytes(int64_t rows) const {
    if (code == kSfLinear) return rows * columns;
    const int64_t tile_rows = code == kSfSwizzled8x4 ? 8 : 128;
    return (rows + tile_rows - 1) / tile_rows * tile_rows * tiles_across() * 4;
  }
};

struct PackedUe8m0 {
  int64_t rows;    // N
  int32_t groups;  // G = hidden / group size

  __host__ __device__ constexpr int32_t packs() const { return (groups + 3) / 4; }
  __host__ __device__ constexpr int64_t lead() const { return (rows + 3) / 4 * 4; }
  __host__ __device__ constexpr int64_t word(int64_t t, int32_t pack) const {
    return pack * lead() + t;
  }
  __host__ __device__ constexpr int64_t storage_words() const {
    return rows + (packs() - 1) * lead();
  }
};

}  // namespace fusedcomm
