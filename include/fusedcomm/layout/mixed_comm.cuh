// The mixed-communication row (§12): one row of bytes per rank of a node, mapped by every peer
// at one stride. W = local size, G = kMaxBlocks, S = kSlotBytes, A(x) = x rounded up to 128:
//   abort marks   uint32 [kMaxLocal]        0                ([p]: rank p gave up)
//   block state   MixedBlockState [G]       128              (own: round counter, used packs)
//   Lamport slots [3][G][2][W] x S bytes    A(128 + 32 G)    ([k][b][phase][sender])
// Slots hold the Lamport sentinel (-0.0 in every 16-bit element) except while a round's data
// sits in them. Everything depends on W alone, so every rank sizes the same row.
// python/fusedcomm/runtime/mixed_comm_workspace.py mirrors the numbers.
#pragma once
#include <cstdint>

namespace fusedcomm {

// What one thread block keeps between its rounds, in its own rank's row.
struct MixedBlockState {
  uint32_t buffer;      // the slot buffer of this block's next round (0, 1, 2, rotating)
  uint32_t used[3][2];  // packs per sender slot written into buffer k, phase p, by its round
  uint32_t reserved;
};
static_assert(sizeof(MixedBlockState) == 32, "MixedBlockState is 32 bytes");

struct MixedCommLayout {
  static constexpr int kMaxBlocks = 128;       // G: thread blocks of one call at most
  static constexpr int64_t kSlotBytes = 8192;  // S: one (buffer, block, phase, sender) slot
  static constexpr int64_t kSlotPacks = kSlotBytes / 16;
  static constexpr int kMaxLocal = 8;  // ranks of one node
  static constexpr int kBuffers = 3;   // rotation: read k, clear k - 1, peers write k + 1 next
  static constexpr int64_t kAlign = 128;

  int32_t local_size;  // W

  __host__ __device__ static constexpr int64_t align(int64_t n) {
    return (n + kAlign - 1) / kAlign * kAlign;
  }
  __host__ __device__ constexpr int64_t abort_marks() const { return 0; }
  __host__ __device__ constexpr int64_t block_state() const { return kAlign; }
  __host__ __device__ constexpr int64_t slots() const {
    return align(block_state() + int64_t{32} * kMaxBlocks);
  }
  __host__ __device__ constexpr int64_t size_per_rank() const {
    return slots() + int64_t{kBuffers} * kMaxBlocks * 2 * local_size * kSlotBytes;
  }
  // Byte offset of slot [k][b][phase][sender].
  __host__ __device__ constexpr int64_t slot(int k, int b, int phase, int sender) const {
    return slots() +
           (((int64_t{k} * kMaxBlocks + b) * 2 + phase) * local_size + sender) * kSlotBytes;
  }
};

// How a call's P packs (of x_in, or of one DP block of it for the reduce-scatter ops) spread
// over rounds: `items` consecutive ranges of nearly equal size, item i = [i P / items,
// (i + 1) P / items), on block i % blocks, in that block's round i / blocks. Every item fits a
// slot and holds at least `min_item` packs (the two-round modes give each TP owner a piece).
// The plan depends only on P, the mode and the grid, which every rank shares.
struct MixedCommPlan {
  int64_t packs;
  int64_t items;
  int32_t blocks;

  __host__ __device__ static constexpr MixedCommPlan make(int64_t p, int min_item, int grid) {
    const int64_t fit = (p + MixedCommLayout::kSlotPacks - 1) / MixedCommLayout::kSlotPacks;
    const int64_t spread = p / (min_item > 0 ? min_item : 1);
    const int64_t g = grid < MixedCommLayout::kMaxBlocks ? grid : MixedCommLayout::kMaxBlocks;
    const int64_t want = spread < g ? spread : g;
    const int64_t items = p <= 0 ? 0 : (fit > want ? fit : (want > 0 ? want : 1));
    const int64_t blocks = items < g ? items : g;
    return MixedCommPlan{p, items, static_cast<int32_t>(blocks)};
  }
  __host__ __device__ constexpr int64_t begin(int64_t item) const { return item * packs / items; }

  // Whether a call asked to run in two rounds does: only with tp > 1 and at least a pack per
  // owner (fewer packs than owners run in one round: the same sums in the same order).
  __host__ __device__ static constexpr bool two_rounds(bool asked, int tp, int64_t p) {
    return asked && tp > 1 && p >= tp;
  }
  // The plan of a call of P packs (`two`: the result of two_rounds).
  __host__ __device__ static constexpr MixedCommPlan for_call(int64_t p, int tp, bool two,
                                                              int grid) {
    return make(p, two ? (tp > 4 ? tp : 4) : 4, grid);
  }
};

}  // namespace fusedcomm
