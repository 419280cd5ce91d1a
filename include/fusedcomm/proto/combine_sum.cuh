// The fixed summation order of a MoE all-to-all combine (one token, top_k terms, fp32).
//
// For top_k in {2, 4, 6, 8, 10, 16, 22} a pairwise tree: each level first sets aside the last
// live partial sum if their number is odd, then adds adjacent pairs (the second into the
// first); once one sum is left, the set-aside sums are added into it in ascending slot order.
// Every other top_k sums sequentially in k. CombineTree<K> lists the additions acc[a] += acc[b]
// at compile time; combine_sum<K> runs them on one fp32 lane. The reference
// (fusedcomm.reference.moe_a2a.combine_sum_steps) lists the same steps.
#pragma once

namespace fusedcomm {

__host__ __device__ constexpr bool combine_is_pairwise(int k) {
  return k == 2 || k == 4 || k == 6 || k == 8 || k == 10 || k == 16 || k == 22;
}

template <int K>
struct CombineTree {
  int a[K > 1 ? K - 1 : 1] = {};
  int b[K > 1 ? K - 1 : 1] = {};
  int steps = 0;  // always K - 1

  constexpr CombineTree() {
    if (!combine_is_pairwise(K)) {
      for (int k = 1; k < K; ++k) add(0, k);
      return;
    }
    int live[K] = {}, left[K] = {};
    int n = K, n_left = 0;
    for (int k = 0; k < K; ++k) live[k] = k;
    while (n > 1) {
      if (n % 2 == 1) left[n_left++] = live[--n];
      for (int i = 0; i < n; i += 2) add(live[i], live[i + 1]);
      for (int i = 0; i < n / 2; ++i) live[i] = live[2 * i];
      n /= 2;
    }
    // Set-aside sums were collected from later levels' ends: each is smaller than the last.
    for (int i = n_left - 1; i >= 0; --i) add(0, left[i]);
  }

 private:
  constexpr void add(int x, int y) {
    a[steps] = x;
    b[steps] = y;
    ++steps;
  }
};

template <int K>
__device__ __forceinline__ float combine_sum(float (&acc)[K]) {
  constexpr CombineTree<K> tree{};
#pragma unroll
  for (int s = 0; s < K - 1; ++s) acc[tree.a[s]] += acc[tree.b[s]];
  return acc[0];
}

}  // namespace fusedcomm
