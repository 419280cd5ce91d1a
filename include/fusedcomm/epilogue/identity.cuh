// Epilogues: what a kernel does with a reduced value before it stores it.
//
// An epilogue is a small type with a const call operator. The elementwise all-reduces call it on
// each reduced 16-byte pack and store what it returns; the fused all-reduce family composes
// per-token epilogues (residual add, RMSNorm, quantizers) the same way, one header each here.
#pragma once
#include "fusedcomm/common/vec.cuh"

namespace fusedcomm {

// The plain all-reduce: the sum itself.
struct Identity {
  template <typename T>
  __device__ __forceinline__ Pack<T> operator()(const Pack<T>& sum) const {
    return sum;
  }
};

}  // namespace fusedcomm
