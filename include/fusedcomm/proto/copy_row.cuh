// copy_row: a team of threads copies one row of bytes (scatter_row: to several destinations).
// `kWidth` bytes per access (16, 8, 4, 2 or 1): the source, the destination and the row length must
// be multiples of it. Thread `lane` of `team` threads takes pieces lane, lane + team, ...; four
// loads are in flight before the stores.
#pragma once
#include <cstdint>

namespace fusedcomm {

template <int kWidth>
struct Piece;
template <>
struct Piece<16> {
  using type = uint4;
};
template <>
struct Piece<8> {
  using type = uint2;
};
template <>
struct Piece<4> {
  using type = uint32_t;
};
template <>
struct Piece<2> {
  using type = uint16_t;
};
template <>
struct Piece<1> {
  using type = uint8_t;
};

// scatter_row: copy_row to every destination dst_of(d), d < num_dests (nullptr: skip), loading
// each piece once.
template <int kWidth, typename DstOf>
__device__ __forceinline__ void scatter_row(const DstOf& dst_of, int num_dests, const uint8_t* src,
                                            int64_t bytes, int lane, int team) {
  using P = typename Piece<kWidth>::type;
  constexpr int kUnroll = 4;
  const P* s = reinterpret_cast<const P*>(src);
  const int64_t n = bytes / kWidth;
  for (int64_t base = lane; base < n; base += int64_t{team} * kUnroll) {
    P v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t{u} * team;
      if (i < n) v[u] = s[i];
    }
    for (int k = 0; k < num_dests; ++k) {
      P* d = reinterpret_cast<P*>(dst_of(k));
      if (d == nullptr) continue;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + int64_t{u} * team;
        if (i < n) d[i] = v[u];
      }
    }
  }
}

template <typename DstOf>
__device__ __forceinline__ void scatter_row_width(int width, const DstOf& dst_of, int num_dests,
                                                  const uint8_t* src, int64_t bytes, int lane,
                                                  int team) {
  switch (width) {
    case 16: scatter_row<16>(dst_of, num_dests, src, bytes, lane, team); break;
    case 8: scatter_row<8>(dst_of, num_dests, src, bytes, lane, team); break;
    case 4: scatter_row<4>(dst_of, num_dests, src, bytes, lane, team); break;
    case 2: scatter_row<2>(dst_of, num_dests, src, bytes, lane, team); break;
    default: scatter_row<1>(dst_of, num_dests, src, bytes, lane, team); break;
  }
}

template <int kWidth>
__device__ __forceinline__ void copy_row(uint8_t* dst, const uint8_t* src, int64_t bytes, int lane,
                                         int team) {
  scatter_row<kWidth>([dst](int) { return dst; }, 1, src, bytes, lane, team);
}

}  // namespace fusedcomm
