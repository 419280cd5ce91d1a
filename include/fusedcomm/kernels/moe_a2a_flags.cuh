// Flag values of the MoE all-to-all and the abort mark, disjoint by construction.
//
// A flag word is 32 bits: the top bit (kPushBit) says a combine pushed its rows, the 31 bits
// below it hold the round's value. Every dispatch and combine takes the next value of its
// rank's own counter (the row's flag value field, 0 after initialisation):
//   1, 2, ..., kMaxFlagValue, 1, 2, ...
// Ranks call the same sequence of ops, so the values agree; 0 is never used. The abort mark
// kA2AAborted has every bit set, so its value field is kFlagValueMask, which is above
// kMaxFlagValue: no flag a kernel stores, with or without kPushBit, is ever the abort mark,
// however many rounds a workspace serves. Host code (tests) compiles this header too.
#pragma once
#include <cstdint>

namespace fusedcomm {

constexpr uint32_t kA2AAborted = 0xffffffffu;
constexpr uint32_t kPushBit = 0x80000000u;
constexpr uint32_t kFlagValueMask = kPushBit - 1;       // the value field of a flag word
constexpr uint32_t kMaxFlagValue = kFlagValueMask - 1;  // the last value before the wrap

__host__ __device__ constexpr uint32_t next_flag_value(uint32_t v) {
  return v >= kMaxFlagValue ? 1u : v + 1;
}

static_assert((kA2AAborted & kFlagValueMask) > kMaxFlagValue,
              "the abort mark's value field must lie outside the flag values");
static_assert((kMaxFlagValue | kPushBit) != kA2AAborted && kMaxFlagValue != kA2AAborted,
              "no flag value, pushed or not, may equal the abort mark");
static_assert(next_flag_value(kMaxFlagValue) == 1 && next_flag_value(0) == 1,
              "the values wrap to 1 and never take 0");
static_assert(next_flag_value(kMaxFlagValue - 1) == kMaxFlagValue, "every value is used");

}  // namespace fusedcomm
