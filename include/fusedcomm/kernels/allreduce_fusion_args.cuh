// Launch arguments, patterns and the shared prologue/epilogue of the Lamport all-reduce family.
//
// JIT key (template arguments; see python/fusedcomm/jit/allreduce_fusion.py): T (fp32, fp16,
// bf16), kWorld (2, 4, 8, or 0 = any world size up to kMaxRanks, read at run time), kPattern
// (an AllReduceFusionPattern with a row in kPatternStages) and kPacks (packs per thread of a
// token row).
// Run-time arguments: everything in FusionArgs.
//
// A pattern is a compile-time composition of epilogues (epilogue/):
//   0  store the sum                                  (allreduce_out)
//   1  ResidualAdd, RmsNorm(norm_out)                 (residual_out, norm_out)
//   2  ResidualAdd, RmsNorm, QuantFp8Static           (residual_out, quant_out)
//   3  ResidualAdd, RmsNorm, QuantNvfp4               (residual_out, quant_out, scale_out)
//   4  ResidualAdd, RmsNorm(norm_out), QuantFp8Static (+ norm_out)
//   5  ResidualAdd, RmsNorm(norm_out), QuantNvfp4
//   8  ResidualAdd, RmsNorm, QuantFp8Group            (residual_out, quant_out, scale_out)
//   9  ResidualAdd, RmsNorm(norm_out), QuantFp8Group
//   10 ResidualAdd, RmsNorm, QuantFp8Dynamic          (residual_out, quant_out, scale_out)
//   11 ResidualAdd, RmsNorm(norm_out), QuantFp8Dynamic
// The MoE patterns replace the input row with a prologue (proto/moe_input.cuh) and make the
// outputs other than norm_out optional (written when given), one-shot only:
//   6  MoeReductionInput; [allreduce_out], ResidualAdd[residual_out], RmsNorm(norm_out),
//      [QuantNvfp4 when quant_out is given]
//   7  MoeFinalizeInput; the same epilogue
#pragma once
#include "fusedcomm/epilogue/quant_fp8.cuh"
#include "fusedcomm/epilogue/quant_group_fp8.cuh"
#include "fusedcomm/epilogue/quant_nvfp4.cuh"
#include "fusedcomm/epilogue/residual.cuh"
#include "fusedcomm/epilogue/rmsnorm.cuh"
#include "fusedcomm/layout/fusion_workspace.cuh"
#include "fusedcomm/proto/lamport.cuh"
#include "fusedcomm/proto/moe_input.cuh"
#include "fusedcomm/proto/pdl.cuh"
#include "fusedcomm/sync/wait.cuh"

namespace fusedcomm {

constexpr int kFusionMaxThreads = 1024;
constexpr int kFusionMaxPacks = 8;  // packs per thread: rows up to 8 * 1024 * 16 = 128 KiB
constexpr int32_t kOpAllReduceFusion = 2;

// Algorithms (the announced call word's low 2 bits; the meeting tag's high nibble) and phases.
// The names the host prints come from the binding (allreduce_fusion_describe).
enum FusionAlgorithm : int32_t { kFusionAuto = 0, kFusionOneshot = 1, kFusionTwoshot = 2 };
enum FusionPhase : int32_t { kFusionPull = 0, kFusionStaged = 1, kFusionReduced = 2 };

__host__ __device__ constexpr uint32_t fusion_tag(FusionAlgorithm a, FusionPhase p) {
  return (uint32_t(a) << 4) | uint32_t(p);
}

enum class Quant { kNone, kStatic, kDynamic, kNvfp4, kGroupFp8 };
enum class Input { kRows, kMoeReduction, kMoeFinalize };

// What each pattern runs around the all-reduce: where its row comes from, residual add +
// RMSNorm or not, whether the norm is stored, and which quantiser (if any) consumes it. One
// row per pattern with kernels.
struct PatternStages {
  int pattern;
  bool norm, norm_out;
  Quant quant;
  Input input;
};
constexpr PatternStages kPatternStages[] = {
    {0, false, false, Quant::kNone, Input::kRows},
    {1, true, true, Quant::kNone, Input::kRows},
    {2, true, false, Quant::kStatic, Input::kRows},
    {3, true, false, Quant::kNvfp4, Input::kRows},
    {4, true, true, Quant::kStatic, Input::kRows},
    {5, true, true, Quant::kNvfp4, Input::kRows},
    {6, true, true, Quant::kNvfp4, Input::kMoeReduction},
    {7, true, true, Quant::kNvfp4, Input::kMoeFinalize},
    {8, true, false, Quant::kGroupFp8, Input::kRows},
    {9, true, true, Quant::kGroupFp8, Input::kRows},
    {10, true, false, Quant::kDynamic, Input::kRows},
    {11, true, true, Quant::kDynamic, Input::kRows},
};

constexpr PatternStages stages_of(int pattern) {
  for (const PatternStages& s : kPatternStages) {
    if (s.pattern == pattern) return s;
  }
  return PatternStages{-1, false, false, Quant::kNone, Input::kRows};
}

template <int kPattern>
struct PatternTraits {
  static constexpr PatternStages kStages = stages_of(kPattern);
  static_assert(kStages.pattern == kPattern, "this pattern has no fusion kernels");
  static constexpr bool kNorm = kStages.norm, kNormOut = kStages.norm_out;
  static constexpr Quant kQuant = kStages.quant;
  static constexpr Input kInput = kStages.input;
  static constexpr bool kMoe = kInput != Input::kRows;  // optional outputs, one-shot only
};

struct FusionArgs {
  const int64_t* table;    // the workspace pointer table (device), see FusionTable
  FusionControl* control;  // this rank's control block
  const void* input;       // [token_num, hidden] of T
  void* allreduce_out;
  const void* residual_in;
  void* residual_out;
  void* norm_out;
  void* quant_out;
  void* scale_out;  // fp32 per token (10, 11), SfLayout bytes (3, 5), PackedUe8m0 (8, 9)
  const void* gamma;
  const float* scale_factor;        // [1] fp32: the static FP8 scale (2, 4) or NVFP4 global scale
  float global_scale;               // the NVFP4 global scale when scale_factor is null (6, 7)
  MoeReductionInput moe_reduction;  // pattern 6
  MoeFinalizeInput moe_finalize;    // pattern 7
  int32_t moe_split;                // blocks per token of a MoE call (1 = one)
  int64_t token_num;
  int64_t segment_bytes;
  int32_t row_packs;  // hidden * sizeof(T) / 16
  int32_t hidden;
  int32_t sf_layout;   // SfLayoutCode (3, 5)
  int32_t group_size;  // elements per group (8, 9)
  float eps;
  float weight_bias;
  FailureState failure;
  uint64_t timeout_ns;
  int32_t rank;
  int32_t world;
  bool fp32_acc;
  bool trigger_at_end;
};

// What every block reads once from the pointer table and the control block (thread 0 fills
// it, after pdl_wait, then the block synchronises).
struct FusionShared {
  FailureSite site;
  char* comm[kMaxRanks];
  char* lamport[kMaxRanks];
  FusionFlags* flags[kMaxRanks];
  PeerSignal* meet[kMaxRanks];
  int32_t segment;
  int32_t clear_packs;
  uint32_t call;  // this call's number (calls completed + 1)
  bool dead;      // the communicator failed earlier: do nothing
};

__device__ __forceinline__ void load_shared(FusionShared& s, const FusionArgs& a) {
  if (threadIdx.x == 0) {
    const FusionTable t{a.world};
    for (int q = 0; q < a.world; ++q) {
      s.comm[q] = reinterpret_cast<char*>(a.table[t.comm(q)]);
      s.flags[q] = reinterpret_cast<FusionFlags*>(a.table[t.flags(q)]);
      s.lamport[q] = reinterpret_cast<char*>(a.table[t.lamport(q)]);
      s.meet[q] = &s.flags[q]->meet;
      s.site.marks[q] = s.flags[q]->meet.abort_mark;
    }
    s.site.failure = a.failure;
    s.site.timeout_ns = a.timeout_ns;
    s.site.op = kOpAllReduceFusion;
    s.site.rank = a.rank;
    s.site.world = a.world;
    s.segment = a.control->segment;
    s.clear_packs = a.control->clear_packs;
    s.call = static_cast<uint32_t>(a.control->calls) + 1;
    s.dead = s.site.failed();
  }
  __syncthreads();
}

// The start of every kernel of the family, after `begin_call`: the block's shared state and
// the sizes every phase uses.
struct FusionCall {
  FusionShared* s;
  int world;  // kWorld, or the run-time world size when kWorld is 0
  int rank;
  int packs;           // packs per token row
  int64_t slot_packs;  // L in packs: token_num * packs
  uint32_t digest;     // fusion_shape_digest of the call (announced with it)
};

// The prologue: waits for the previous grid (PDL), fills the shared state (load_shared), lets
// the next grid start unless it waits for our end. The kernel returns at once when s->dead.
template <int kWorld>
__device__ __forceinline__ FusionCall begin_call(const FusionArgs& a) {
  __shared__ alignas(16) unsigned char shared_bytes[sizeof(FusionShared)];
  FusionShared& s = *reinterpret_cast<FusionShared*>(shared_bytes);
  pdl_wait();
  load_shared(s, a);
  if (!a.trigger_at_end) pdl_trigger();
  const int world = kWorld > 0 ? kWorld : a.world;
  return FusionCall{&s,
                    world,
                    a.rank,
                    a.row_packs,
                    a.token_num * a.row_packs,
                    fusion_shape_digest(a.token_num, int64_t{a.row_packs} * 16)};
}

// The end of a call: when the last block has finished, advance the control block (the next
// call reads it only after pdl_wait, i.e. after this grid has completed).
__device__ __forceinline__ void finish_call(const FusionArgs& a, const FusionShared& s,
                                            bool oneshot, int64_t written_packs) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&a.control->arrivals, 1) == static_cast<int>(gridDim.x) - 1) {
      FusionControl* c = a.control;
      if (oneshot) {
        c->segment = (s.segment + 1) % 3;
        c->clear_packs = static_cast<int32_t>(written_packs);
      }
      c->calls = static_cast<int32_t>(s.call & 0x7fffffffu);
      c->arrivals = 0;
    }
  }
  if (a.trigger_at_end) pdl_trigger();
}

// Runs the pattern's epilogue on a reduced row (all threads of the block, same control flow).
template <int kPattern, typename T, int kPacks>
__device__ __forceinline__ void run_epilogue(Row<T, kPacks>& row, const FusionArgs& a,
                                             int64_t token, float quant_scale) {
  using P = PatternTraits<kPattern>;
  const int packs = a.row_packs;
  const int64_t base = token * packs;
  if constexpr (P::kMoe) {
    if (a.allreduce_out != nullptr) {
#pragma unroll
      for (int j = 0; j < kPacks; ++j) {
        if (Row<T, kPacks>::has(j, packs)) {
          store_pack<T>(a.allreduce_out, base + Row<T, kPacks>::index(j), row.v[j]);
        }
      }
    }
    ResidualAdd{a.residual_in, a.residual_out}(row, packs, base);
    RmsNorm{a.gamma, a.norm_out, a.eps, a.weight_bias, a.hidden}(row, packs, base);
    if (a.quant_out != nullptr) {
      const SfLayout layout{a.sf_layout, a.hidden / 16};
      QuantNvfp4{a.quant_out, static_cast<uint8_t*>(a.scale_out), layout, quant_scale}(row, packs,
                                                                                       base, token);
    }
  } else if constexpr (!P::kNorm) {
#pragma unroll
    for (int j = 0; j < kPacks; ++j) {
      if (Row<T, kPacks>::has(j, packs)) {
        store_pack<T>(a.allreduce_out, base + Row<T, kPacks>::index(j), row.v[j]);
      }
    }
  } else {
    ResidualAdd{a.residual_in, a.residual_out}(row, packs, base);
    RmsNorm{a.gamma, P::kNormOut ? a.norm_out : nullptr, a.eps, a.weight_bias, a.hidden}(row, packs,
                                                                                         base);
    if constexpr (P::kQuant == Quant::kStatic) {
      QuantFp8Static{a.quant_out, quant_scale}(row, packs, base);
    } else if constexpr (P::kQuant == Quant::kDynamic) {
      QuantFp8Dynamic{a.quant_out, static_cast<float*>(a.scale_out)}(row, packs, base, token);
    } else if constexpr (P::kQuant == Quant::kNvfp4) {
      const SfLayout layout{a.sf_layout, a.hidden / 16};
      QuantNvfp4{a.quant_out, static_cast<uint8_t*>(a.scale_out), layout, quant_scale}(row, packs,
                                                                                       base, token);
    } else if constexpr (P::kQuant == Quant::kGroupFp8) {
      const PackedUe8m0 layout{a.token_num, a.hidden / a.group_size};
      QuantFp8Group{a.quant_out, static_cast<int32_t*>(a.scale_out), layout, a.group_size}(
          row, packs, base, token);
    }
  }
}

// The row a rank contributes, sanitised for the Lamport buffers (-0 -> +0): the input row, or
// the MoE prologue's result.
template <int kPattern, typename T, int kPacks>
__device__ __forceinline__ void load_input(Row<T, kPacks>& row, const FusionArgs& a,
                                           int64_t token) {
  using P = PatternTraits<kPattern>;
  const int packs = a.row_packs;
  if constexpr (P::kInput == Input::kMoeReduction) {
    a.moe_reduction.load(row, packs, token, a.token_num);
  } else if constexpr (P::kInput == Input::kMoeFinalize) {
    a.moe_finalize.load(row, packs, token, a.token_num);
  }
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    if (Row<T, kPacks>::has(j, packs)) {
      if constexpr (P::kInput == Input::kRows) {
        row.v[j] = load_pack<T>(a.input, token * packs + Row<T, kPacks>::index(j));
      }
      row.v[j] = lamport_sanitize(row.v[j]);
    }
  }
}

// What the quantiser needs from scale_factor[0] (read after pdl_wait): its inverse for static
// FP8, the global scale itself for NVFP4; unused otherwise.
template <int kPattern>
__device__ __forceinline__ float quant_scale(const FusionArgs& a) {
  if constexpr (PatternTraits<kPattern>::kQuant == Quant::kStatic) {
    return 1.0f / *a.scale_factor;
  } else if constexpr (PatternTraits<kPattern>::kQuant == Quant::kNvfp4) {
    return a.scale_factor != nullptr ? *a.scale_factor : a.global_scale;
  } else {
    return 0.0f;
  }
}

}  // namespace fusedcomm
