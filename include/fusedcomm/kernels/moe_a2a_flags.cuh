// Flag values of the MoE all-to-all and the abort mark, disjoint by construction.
//
// A flag word is 32 bits: the top two bits are a combine's mode (kPushBit: it pushed its rows;
// kLowBit: its rows are on the low-precision wire format), the 30 bits below them hold the
// round's value. Every dispatch and combine takes the next value of its rank's own counter
// (the row's flag value field, 0 after initialisation):
//   1, 2, ..., kMaxFlagValue, 1, 2, ...
// Ranks call the same sequence of ops, so the values agree; 0 is never used. The abort mark
// kA2AAborted has every bit set, so its value field is kFlagValueMask, which is above
// kMaxFlagValue: no flag a kernel stores, with any mode bits, is ever the abort mark, however
// many rounds a workspace serves. Host code (tests) compiles this header too.
//
// Dispatch flags also say the round's runtime_max_tokens_per_rank R, which every rank must
// share (it places every slot): dispatch_flag(v, R) keeps the low kStepBits of v (the step)
// and a tag of R above them. A peer's flag of the same step with another tag is a mismatch
// (ranks disagree on R); a flag of another step is an earlier round (consecutive dispatches
// differ by 1 or 2 in the step bits, and no rank gets a round ahead: a dispatch first waits
// for every rank's release of the previous one). Tags of R values that differ by a multiple
// of 2^22 coincide.
#pragma once
#include <cstdint>

namespace fusedcomm {

constexpr uint32_t kA2AAborted = 0xffffffffu;
constexpr uint32_t kPushBit = 0x80000000u;
constexpr uint32_t kLowBit = 0x40000000u;
constexpr uint32_t kFlagValueMask = kLowBit - 1;        // the value field of a flag word
constexpr uint32_t kMaxFlagValue = kFlagValueMask - 1;  // the last value before the wrap

__host__ __device__ constexpr uint32_t next_flag_value(uint32_t v) {
  return v >= kMaxFlagValue ? 1u : v + 1;
}

constexpr int kStepBits = 8;
constexpr uint32_t kStepMask = (1u << kStepBits) - 1;
constexpr uint32_t kRoundTagMask = kFlagValueMask >> kStepBits;

// The round's tag: R plus an odd multiple of the active mask (16 bits), modulo 2^22. Ranks with
// the same R and different masks always get different tags (the multiplier is invertible).
constexpr uint32_t kMaskTagFactor = 0x2545fu;

__host__ __device__ constexpr uint32_t dispatch_flag(uint32_t v, int64_t max_tokens,
                                                     uint32_t active = 0xffffu) {
  const uint64_t tag =
      static_cast<uint64_t>(max_tokens) + uint64_t{active & 0xffffu} * kMaskTagFactor;
  return (static_cast<uint32_t>(tag & kRoundTagMask) << kStepBits) | (v & kStepMask);
}

// Whether `seen` is a peer's flag of the same step as `want` (equal on `step` bits) and no
// abort mark: with seen != want, the peer runs another variant of this step.
__host__ __device__ constexpr bool same_step(uint32_t seen, uint32_t want, uint32_t step) {
  return seen != kA2AAborted && ((seen ^ want) & step) == 0;
}

static_assert(dispatch_flag(kMaxFlagValue, -1) <= kFlagValueMask,
              "a dispatch flag never sets the push bit, so it is never the abort mark");
static_assert(dispatch_flag(5, 7) != dispatch_flag(5, 8) &&
                  dispatch_flag(6, 7) != dispatch_flag(5, 7) &&
                  dispatch_flag(5, 7, 0x3u) != dispatch_flag(5, 7, 0x7u),
              "the step, R and the active mask all show in a dispatch flag");
static_assert((kA2AAborted & kFlagValueMask) > kMaxFlagValue,
              "the abort mark's value field must lie outside the flag values");
static_assert((kMaxFlagValue | kPushBit | kLowBit) != kA2AAborted && kMaxFlagValue != kA2AAborted,
              "no flag value, with any mode bits, may equal the abort mark");
static_assert((kPushBit & kLowBit) == 0 && ((kPushBit | kLowBit) & kFlagValueMask) == 0,
              "the mode bits lie above the value field");
static_assert(next_flag_value(kMaxFlagValue) == 1 && next_flag_value(0) == 1,
              "the values wrap to 1 and never take 0");
static_assert(next_flag_value(kMaxFlagValue - 1) == kMaxFlagValue, "every value is used");

}  // namespace fusedcomm
