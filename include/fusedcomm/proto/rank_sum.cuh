// RankSum: the rank-ordered sum of one 16-byte pack over the ranks (docs/deterministic.md).
//
//   RankSum<T> s(x_0, fp32_acc); s.add(x_1); ...; s.add(x_{W-1}); Pack<T> r = s.result();
// With fp32 accumulation (fp32_acc, or T = float) the sum is kept in fp32 and rounded to T
// once; without it every partial sum is rounded to T (a <- rd_T(float(a) + float(x_q))).
// Callers add ranks in ascending order, so every rank gets the same bits.
#pragma once
#include "fusedcomm/common/vec.cuh"

namespace fusedcomm {

template <typename T>
struct RankSum {
  float acc[Pack<T>::kElems];
  bool fp32;

  __device__ __forceinline__ RankSum(const Pack<T>& first, bool fp32_acc) : fp32(fp32_acc) {
    unpack_to(first, acc);
  }

  __device__ __forceinline__ void add(const Pack<T>& x) {
    accumulate(acc, x);
    if (!fp32) {
#pragma unroll
      for (int i = 0; i < Pack<T>::kElems; ++i) acc[i] = to_float(from_float<T>(acc[i]));
    }
  }

  __device__ __forceinline__ Pack<T> result() const { return pack_from<T>(acc); }
};

}  // namespace fusedcomm
