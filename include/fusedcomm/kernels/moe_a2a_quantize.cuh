// Quantised combine outputs: the rows the combine summed (rounded to the payload's 16-bit T,
// kernels/moe_a2a_combine.cuh) quantised row by row with one of the fusion family's block
// quantisers (epilogue/quant_nvfp4.cuh, epilogue/quant_mx.cuh), as the reference library does
// (its quantiser too reads the T-rounded sum).
//
// One block per row (grid-stride): thread t loads packs t, t + B, ... into a Row<T, kPacks>
// (packs <= kPacks * B, the host picks kPacks), then the quantiser writes codes and scale bytes.
// Every thread of a block takes part in every row (the quantisers' warp shuffles need it).
// Runs after the combine on the same stream: it reads nothing of the workspace.
#pragma once
#include "fusedcomm/common/vec.cuh"
#include "fusedcomm/proto/pdl.cuh"
#include "fusedcomm/proto/row.cuh"

namespace fusedcomm {

struct MoeQuantizeArgs {
  const uint8_t* in;  // [rows, packs * 16 bytes] of T, contiguous
  int64_t rows;       // local_num_tokens
  int32_t packs;      // hidden / 8
};

template <typename T, int kPacks, typename Q, int kThreads>
__global__ void __launch_bounds__(kThreads) moe_a2a_quantize(MoeQuantizeArgs a, Q q) {
  pdl_wait();
  for (int64_t t = blockIdx.x; t < a.rows; t += gridDim.x) {
    const uint8_t* src = a.in + t * a.packs * 16;
    Row<T, kPacks> row;
#pragma unroll
    for (int j = 0; j < kPacks; ++j) {
      row.v[j].raw = make_uint4(0, 0, 0, 0);
      if (Row<T, kPacks>::has(j, a.packs)) row.v[j] = load_pack<T>(src, Row<T, kPacks>::index(j));
    }
    q.template operator()<T, kPacks>(row, a.packs, t * a.packs, t);
  }
  pdl_trigger();
}

}  // namespace fusedcomm
