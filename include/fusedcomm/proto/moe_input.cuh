// MoE prologues: the row each rank all-reduces in the MoE fusions (patterns 6 and 7).
//
// Contract: input.compute_pack<T>(token, token_num, packs, pack) returns pack `pack` of `token`'s
// prologue result, and input.load<T, kPacks>(row, packs, token, token_num) fills row.v[j] for
// every slot j inside the row (Row::has) with it, rounded to T after every step
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
//   An idx entry is -1 (skipped) or a row of `permuted`; an entry outside [0, rows) is
//   skipped too, so a bad index never reads out of bounds (the frontend's check_indices option
//   reports it instead).
// Both fetch kMoeAhead rows ahead so that their loads overlap; the sums keep the order.
#pragma once
#include "fusedcomm/proto/row.cuh"

namespace fusedcomm {

namespace detail {

// Rows fetched ahead per round of a prologue: their loads are in flight together (the sum
// itself keeps the specified order).
constexpr int kMoeAhead = 8;

// acc = rd(acc + x), or rd(acc + rd(x * s)) when kScaled; acc holds values of T as floats.
template <bool kScaled, typename T>
__device__ __forceinline__ void add_rounded(float (&acc)[Pack<T>::kElems], const Pack<T>& x,
                                            float s = 1.0f) {
  float v[Pack<T>::kElems];
  unpack_to(x, v);
#pragma unroll
  for (int i = 0; i < Pack<T>::kElems; ++i) {
    const float term = kScaled ? to_float(from_float<T>(v[i] * s)) : v[i];
    acc[i] = to_float(from_float<T>(acc[i] + term));
  }
}

// row.v[j] = input.compute_pack(...) for every slot j inside the row
template <typename Input, typename T, int kPacks>
__device__ __forceinline__ void load_row(const Input& input, Row<T, kPacks>& row, int packs,
                                         int64_t token, int64_t token_num) {
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    const int i = Row<T, kPacks>::index(j);
    if (i < packs) row.v[j] = input.template compute_pack<T>(token, token_num, packs, i);
  }
}

}  // namespace detail

struct MoeReductionInput {
  const void* experts;      // [num_experts, token_num, D] T
  const float* scales;      // [num_experts, token_num]
  const void* token_input;  // [token_num, D] T
  int32_t num_experts;

  // Pack `pack` of `token`'s result (rows of `packs` packs).
  template <typename T>
  __device__ __forceinline__ Pack<T> compute_pack(int64_t token, int64_t token_num, int packs,
                                                  int pack) const {
    constexpr int kAhead = detail::kMoeAhead;
    float acc[Pack<T>::kElems] = {};
    for (int e0 = 0; e0 < num_experts; e0 += kAhead) {
      Pack<T> x[kAhead];
      float s[kAhead];
#pragma unroll
      for (int c = 0; c < kAhead; ++c) {
        if (e0 + c >= num_experts) break;
        const int64_t slot = (e0 + c) * token_num + token;
        s[c] = scales[slot];
        x[c] = load_pack<T>(experts, slot * packs + pack);
      }
#pragma unroll
      for (int c = 0; c < kAhead; ++c) {
        if (e0 + c >= num_experts) break;
        detail::add_rounded<true>(acc, x[c], s[c]);
      }
    }
    detail::add_rounded<false>(acc, load_pack<T>(token_input, token * packs + pack));
    return pack_from<T>(acc);
  }

  template <typename T, int kPacks>
  __device__ __forceinline__ void load(Row<T, kPacks>& row, int packs, int64_t token,
                                       int64_t token_num) const {
    detail::load_row(*this, row, packs, token, token_num);
  }
};

struct MoeFinalizeInput {
  const void* permuted;      // [P, D] T
  const int32_t* idx;        // [token_num, top_k]
  const void* expert_scale;  // [token_num, top_k] T, or null
  const void* shared;        // [token_num, D] T, or null
  int64_t rows;              // P
  float routed_scaling;
  int32_t top_k;

  template <typename T>
  __device__ __forceinline__ Pack<T> compute_pack(int64_t token, int64_t token_num, int packs,
                                                  int pack) const {
    (void)token_num;  // rows of idx are top_k long; every other tensor is indexed by token
    constexpr int kAhead = detail::kMoeAhead;
    const T* weights = static_cast<const T*>(expert_scale);
    float acc[Pack<T>::kElems] = {};
    for (int k0 = 0; k0 < top_k; k0 += kAhead) {
      int32_t p[kAhead];
      float w[kAhead];
#pragma unroll
      for (int c = 0; c < kAhead; ++c) {
        const int64_t at = token * top_k + k0 + c;
        p[c] = k0 + c < top_k ? idx[at] : -1;
        if (p[c] >= rows) p[c] = -1;
        w[c] = weights != nullptr && k0 + c < top_k ? to_float(weights[at]) : 1.0f;
      }
      Pack<T> x[kAhead];
#pragma unroll
      for (int c = 0; c < kAhead; ++c) {
        if (p[c] >= 0) x[c] = load_pack<T>(permuted, int64_t(p[c]) * packs + pack);
      }
#pragma unroll
      for (int c = 0; c < kAhead; ++c) {
        if (p[c] < 0) continue;
        if (weights != nullptr) {
          detail::add_rounded<true>(acc, x[c], w[c]);
        } else {
          detail::add_rounded<false>(acc, x[c]);
        }
      }
    }
    if (routed_scaling != 1.0f) {
#pragma unroll
      for (int i = 0; i < Pack<T>::kElems; ++i)
        acc[i] = to_float(from_float<T>(acc[i] * routed_scaling));
    }
    if (shared != nullptr)
      detail::add_rounded<false>(acc, load_pack<T>(shared, token * packs + pack));
    return pack_from<T>(acc);
  }

  template <typename T, int kPacks>
  __device__ __forceinline__ void load(Row<T, kPacks>& row, int packs, int64_t token,
                                       int64_t token_num) const {
    detail::load_row(*this, row, packs, token, token_num);
  }
};

}  // namespace fusedcomm
