// ResidualAdd: the first step of the fused patterns (python/fusedcomm/reference/fusion.py).
//
//   p_j = rd_T(float(s_j) + float(residual_in_j)), written to residual_out (unless it is null:
//   the MoE patterns make it optional); the row becomes p.
// residual_out may be residual_in (or the input): each pack is read before it is written, by
// the same thread.
#pragma once
#include "fusedcomm/proto/row.cuh"

namespace fusedcomm {

struct ResidualAdd {
  const void* residual_in;
  void* residual_out;

  // `base`: the row's first pack in the [token_num, hidden] tensors; `packs`: packs per row.
  template <typename T, int kPacks>
  __device__ __forceinline__ void operator()(Row<T, kPacks>& row, int packs, int64_t base) const {
    row.for_each_pack(packs, [&](int j, float (&acc)[Pack<T>::kElems]) {
      const int64_t i = base + Row<T, kPacks>::index(j);
      accumulate(acc, load_pack<T>(residual_in, i));
      row.v[j] = pack_from<T>(acc);
      if (residual_out != nullptr) store_pack<T>(residual_out, i, row.v[j]);
    });
  }
};

}  // namespace fusedcomm
