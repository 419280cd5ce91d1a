// MoE prologues: the row each rank all-reduces in the MoE fusions (patterns 6 and 7).
//
// Contract: input.load<T, kPacks>(row, packs, token, token_num) fills row.v[j] for every slot j
// inside the row (Row::has) with `token`'s prologue result, rounded to T after every step
// (rd = round to nearest even; products and sums in fp32 on the T values), exactly as
// fusedcomm.reference.moe computes it. Tensors are contiguous, rows of `packs` 16-byte packs.
//
//   MoeReductionInput (pattern 6): experts [E, token_num, D] T, scales [E, token_num] fp32,
//   token_input [token_num, D] T:
//     acc = 0; for e: acc = rd(acc + rd(experts[e, t] * scales[e, t]));
//     acc = rd(acc + token_input[t])
//   MoeFinalizeInput (pattern 7): permuted [P, D] T, idx [token_num, top_k] int32,
//   expert_scale [token_num, top_k] T or null, shared [token_num, D] T or null:
//     acc = 0; for k with p = idx[t, k] >= 0:
//       acc = rd(acc + rd(permuted[p] * expert_scale[t, k]))   (expert_scale given)
//       acc = rd(acc + permuted[p])                            (otherwise)
//     if routed_scaling != 1: acc = rd(acc * routed_scaling)
//     if shared: acc = rd(acc + shared[t])
//   An idx entry is -1 (skipped) or a row of `permuted`: the caller's contract, not checked
//   here; every negative entry is skipped.
// Both fetch a few rows ahead (kMoeChunk) so that their loads overlap; the sums keep the order.
#pragma once
#include "fusedcomm/proto/row.cuh"

namespace fusedcomm {

namespace detail {

// Rows fetched ahead per round of a prologue: kChunk rows of kPacks packs are loaded before any
// is summed, so their latencies overlap (the sum itself stays in the specified order).
template <int kPacks>
constexpr int kMoeChunk = kPacks >= 8 ? 1 : 8 / kPacks;

// Every slot of the row set to +0.0 (all-zero bits in fp16 and bf16).
template <typename T, int kPacks>
__device__ __forceinline__ void zero_row(Row<T, kPacks>& row) {
#pragma unroll
  for (int j = 0; j < kPacks; ++j) row.v[j].raw = make_uint4(0u, 0u, 0u, 0u);
}

// x = the row's slots of src[base + ...]
template <typename T, int kPacks>
__device__ __forceinline__ void fetch_row(Pack<T> (&x)[kPacks], int packs, const void* src,
                                          int64_t base) {
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    if (Row<T, kPacks>::has(j, packs)) x[j] = load_pack<T>(src, base + Row<T, kPacks>::index(j));
  }
}

// row = rd(row + x), or row = rd(row + rd(x * s)) when kScaled
template <bool kScaled, typename T, int kPacks>
__device__ __forceinline__ void add_row(Row<T, kPacks>& row, int packs, const Pack<T> (&x)[kPacks],
                                        float s = 1.0f) {
  row.for_each_pack(packs, [&](int j, float (&acc)[Pack<T>::kElems]) {
    if constexpr (kScaled) {
      float v[Pack<T>::kElems];
      unpack_to(x[j], v);
#pragma unroll
      for (int i = 0; i < Pack<T>::kElems; ++i) v[i] *= s;
      accumulate(acc, pack_from<T>(v));  // the product is rounded to T before the sum
    } else {
      accumulate(acc, x[j]);
    }
    row.v[j] = pack_from<T>(acc);
  });
}

// row = rd(row * s)
template <typename T, int kPacks>
__device__ __forceinline__ void scale_row(Row<T, kPacks>& row, int packs, float s) {
  row.for_each_pack(packs, [&](int j, float (&acc)[Pack<T>::kElems]) {
#pragma unroll
    for (int i = 0; i < Pack<T>::kElems; ++i) acc[i] *= s;
    row.v[j] = pack_from<T>(acc);
  });
}

}  // namespace detail

struct MoeReductionInput {
  const void* experts;      // [num_experts, token_num, D] T
  const float* scales;      // [num_experts, token_num]
  const void* token_input;  // [token_num, D] T
  int32_t num_experts;

  template <typename T, int kPacks>
  __device__ __forceinline__ void load(Row<T, kPacks>& row, int packs, int64_t token,
                                       int64_t token_num) const {
    constexpr int kChunk = detail::kMoeChunk<kPacks>;
    detail::zero_row(row);
    for (int e0 = 0; e0 < num_experts; e0 += kChunk) {
      Pack<T> x[kChunk][kPacks];
      float s[kChunk];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        if (e0 + c >= num_experts) break;
        const int64_t slot = (e0 + c) * token_num + token;
        s[c] = scales[slot];
        detail::fetch_row(x[c], packs, experts, slot * packs);
      }
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        if (e0 + c >= num_experts) break;
        detail::add_row<true>(row, packs, x[c], s[c]);
      }
    }
    Pack<T> t[kPacks];
    detail::fetch_row(t, packs, token_input, token * packs);
    detail::add_row<false>(row, packs, t);
  }
};

struct MoeFinalizeInput {
  const void* permuted;      // [P, D] T
  const int32_t* idx;        // [token_num, top_k]
  const void* expert_scale;  // [token_num, top_k] T, or null
  const void* shared;        // [token_num, D] T, or null
  float routed_scaling;
  int32_t top_k;

  template <typename T, int kPacks>
  __device__ __forceinline__ void load(Row<T, kPacks>& row, int packs, int64_t token,
                                       int64_t token_num) const {
    (void)token_num;  // rows of idx are top_k long; every other tensor is indexed by token
    constexpr int kChunk = detail::kMoeChunk<kPacks>;
    detail::zero_row(row);
    const T* weights = static_cast<const T*>(expert_scale);
    for (int k0 = 0; k0 < top_k; k0 += kChunk) {
      int32_t p[kChunk];
      float w[kChunk];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        const int64_t at = token * top_k + k0 + c;
        p[c] = k0 + c < top_k ? idx[at] : -1;
        w[c] = weights != nullptr && k0 + c < top_k ? to_float(weights[at]) : 1.0f;
      }
      Pack<T> x[kChunk][kPacks];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        if (p[c] >= 0) detail::fetch_row(x[c], packs, permuted, int64_t(p[c]) * packs);
      }
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        if (p[c] < 0) continue;
        if (weights != nullptr) {
          detail::add_row<true>(row, packs, x[c], w[c]);
        } else {
          detail::add_row<false>(row, packs, x[c]);
        }
      }
    }
    if (routed_scaling != 1.0f) detail::scale_row(row, packs, routed_scaling);
    if (shared != nullptr) {
      Pack<T> t[kPacks];
      detail::fetch_row(t, packs, shared, token * packs);
      detail::add_row<false>(row, packs, t);
    }
  }
};

}  // namespace fusedcomm
