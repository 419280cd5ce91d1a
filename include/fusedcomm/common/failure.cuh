// Failure records: how a kernel that gives up on a peer tells the host what happened.
//
// Every communicator (a vLLM all-reduce handle, a fusion workspace, ...) owns one FailureState:
//   claim   - one int32 in device memory; the first waiter of this communicator to give up wins
//             it with atomicCAS. Every later wait and launch of the same communicator sees it
//             set and does nothing. Other communicators on the device are not affected.
//   record  - a FailureRecord in pinned host memory mapped into the device; the winner fills it
//             and writes `code` last, so the host can read it without synchronising.
// The record layout, the codes and their names reach Python through the runtime module
// (csrc/runtime.cu), never by re-typing them. Op and phase ids are per family (kernels/).
#pragma once
#include <cstdint>

namespace fusedcomm {

enum FailureCode : int32_t {
  kFailureNone = 0,
  kFailureTimeout = 1,      // the peer did not arrive in time
  kFailurePeerAborted = 2,  // the peer gave up first and said so
  kFailureMismatch = 3,     // the peer is in another phase or algorithm of the same call
};

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
static_assert(sizeof(FailureRecord) == 64, "FailureRecord is 64 bytes");

struct FailureState {
  int32_t* claim = nullptr;         // device memory
  FailureRecord* record = nullptr;  // host memory, device-mapped
};

}  // namespace fusedcomm
