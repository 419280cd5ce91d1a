// Quantised combine outputs: the rows the combine summed (rounded to the payload's 16-bit T,
// kernels/moe_a2a_combine.cuh) quantised row by row with one of the fusion family's block
// quantisers (epilogue/quant_nvfp4.cuh, epilogue/quant_mx.cuh), as the reference library does
// (its quantiser too reads the T-rounded sum).
//
// One block per row (grid-stride): thread t loads packs t, t + B, ... into a Row<T, kPacks>
// (packs <= kPacks * B, the host picks kPacks), then the quantiser writes codes and scale bytes.
// Every thread of a block takes part in every row (the quantisers' warp shuffles need it).
// Runs after the combine on the same stream: it reads nothing of the workspace.
//
// The low-precision wire (moe_a2a_wire, before a combine with kWire): each payload row [src, j],
// j < recv_count[src], becomes its MXFP8 (epilogue/quant_mx.cuh) in slot [src, j] of the own
// combine region: H E4M3 codes, then the H/32 UE8M0 scales (linear). The payload is a tensor
// (a.payload) or already that region (nullptr: converted in place; the block reads the whole
// row before any thread writes). Peers read the slots only after this rank's combine flags,
// which the combine kernel stores after this kernel (same stream; its pdl_wait).
#pragma once
#include "fusedcomm/common/vec.cuh"
#include "fusedcomm/epilogue/quant_mx.cuh"
#include "fusedcomm/kernels/moe_a2a_args.cuh"
#include "fusedcomm/proto/pdl.cuh"
#include "fusedcomm/proto/row.cuh"

namespace fusedcomm {

struct MoeQuantizeArgs {
  const uint8_t* in;  // [rows, packs * 16 bytes] of T, contiguous
  int64_t rows;       // local_num_tokens
  int32_t packs;      // hidden / 8
};

template <typename T, int kPacks>
__device__ __forceinline__ void load_row(Row<T, kPacks>& row, const uint8_t* src, int packs) {
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    row.v[j].raw = make_uint4(0, 0, 0, 0);
    if (Row<T, kPacks>::has(j, packs)) row.v[j] = load_pack<T>(src, Row<T, kPacks>::index(j));
  }
}

template <typename T, int kPacks, typename Q, int kThreads>
__global__ void __launch_bounds__(kThreads) moe_a2a_quantize(MoeQuantizeArgs a, Q q) {
  pdl_wait();
  for (int64_t t = blockIdx.x; t < a.rows; t += gridDim.x) {
    const uint8_t* src = a.in + t * a.packs * 16;
    Row<T, kPacks> row;
    load_row(row, src, a.packs);
    q.template operator()<T, kPacks>(row, a.packs, t * a.packs, t);
  }
  pdl_trigger();
}

template <typename T, int kPacks, int kThreads>
__global__ void __launch_bounds__(kThreads) moe_a2a_wire(MoeCombineArgs a) {
  pdl_wait();
  if (a.site.failed()) return;  // as the combine: peers may still read the last round's rows
  const MoeA2ARows& rows = a.site.rows;
  const int rank = a.site.rank;
  const int32_t* counts = rows.at<int32_t>(rank, rows.layout.recv_counters());
  uint8_t* region = rows.row(rank) + a.region;
  const int packs = static_cast<int>(a.row_bytes / 16);
  const int64_t hidden = a.row_bytes / 2;
  const QuantMxfp8 q0{nullptr, nullptr, SfLayout{kSfLinear, static_cast<int32_t>(hidden / 32)}};
  for (int64_t s = blockIdx.x; s < a.site.world * a.max_tokens; s += gridDim.x) {
    const int src = static_cast<int>(s / a.max_tokens);  // the same in the whole block:
    if (!a.site.is_active(src) || s % a.max_tokens >= counts[src]) continue;
    uint8_t* slot = region + s * a.row_bytes;
    Row<T, kPacks> row;
    load_row(row, a.payload != nullptr ? a.payload + s * a.row_bytes : slot, packs);
    __syncthreads();  // in place: the whole row is read before it is overwritten
    QuantMxfp8 q = q0;
    q.out = slot;
    q.scales = slot + hidden;
    q.template operator()<T, kPacks>(row, packs, 0, 0);
    __syncthreads();
  }
  pdl_trigger();
}

}  // namespace fusedcomm
