// Failure records: how a kernel that gives up on a peer tells the host what happened.
//
// A FailureState is two allocations made once per process and device:
//   claim   - one int32 in device memory; the first waiter to give up wins it with atomicCAS,
//             and every other waiter of any launch sees it set and stops waiting;
//   record  - a FailureRecord in pinned host memory mapped into the device; the winner fills
//             it and writes `code` last, so the host can read it without synchronising.
// The host (python/fusedcomm/runtime/failures.py) raises the record as a Python exception and
// resets both. The enum values below are read by that module from this file.
#pragma once
#include <cstdint>

namespace fusedcomm {

enum FailureCode : int32_t { kFailureNone = 0, kFailureTimeout = 1 };

enum FailureOp : int32_t {
  kOpUnknown = 0,
  kOpVllmAllReduce = 1,
};

enum FailurePhase : int32_t { kPhaseStart = 0, kPhaseMiddle = 1, kPhaseEnd = 2 };

struct FailureRecord {
  int32_t code;
  int32_t op;
  int32_t rank;
  int32_t peer;
  int32_t phase;
  int32_t block;
  uint32_t expected;
  uint32_t observed;
  uint64_t waited_ns;
  uint64_t timeout_ns;
  int32_t world;
  int32_t reserved[3];
};
static_assert(sizeof(FailureRecord) == 64, "FailureRecord is 64 bytes; the host reads it so");

struct FailureState {
  int32_t* claim;          // device memory
  FailureRecord* record;   // host memory, device-mapped
};

}  // namespace fusedcomm
