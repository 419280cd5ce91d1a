// copy_rows: a thread block copies `rows` rows of `bytes` bytes between two strided layouts
// (row i from src + i * src_stride to dst + i * dst_stride), `kWidth` bytes per access (16 or
// 8; addresses, strides and `bytes` must be multiples of it; rows * bytes / kWidth < 2^31). Thread
// `lane` of `team` takes the flat pieces lane, lane + team, ... of the rows.
//
// kFromPeer: the source was written by another GPU and published through a flag the block
// acquired: its loads bypass L1 (ld.global.cg), so no line cached by an earlier round of the
// same buffer is read back.
#pragma once
#include <cstdint>

namespace fusedcomm {

namespace detail {
template <int kWidth>
struct CopyPiece;
template <>
struct CopyPiece<16> {
  using type = uint4;
};
template <>
struct CopyPiece<8> {
  using type = uint2;
};
}  // namespace detail

template <int kWidth, bool kFromPeer>
__device__ __forceinline__ void copy_rows(uint8_t* dst, int64_t dst_stride, const uint8_t* src,
                                          int64_t src_stride, int rows, int bytes, int lane,
                                          int team) {
  using P = typename detail::CopyPiece<kWidth>::type;
  const int per_row = bytes / kWidth;
  const int n = rows * per_row;  // a chunk's worth at most: 32-bit index arithmetic
  for (int i = lane; i < n; i += team) {
    const int r = i / per_row, j = i - r * per_row;
    const P* s = reinterpret_cast<const P*>(src + r * src_stride) + j;
    P v;
    if constexpr (kFromPeer) {
      v = __ldcg(s);
    } else {
      v = *s;
    }
    *(reinterpret_cast<P*>(dst + r * dst_stride) + j) = v;
  }
}

}  // namespace fusedcomm
