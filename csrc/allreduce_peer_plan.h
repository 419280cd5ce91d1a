// The launch planner of the peer-to-peer (vLLM-style) all-reduce: a pure function of the
// message size, world size and the call's static choices, so every rank decides alike.
#pragma once
#include <cstdint>

#include "fusedcomm/kernels/allreduce_args.cuh"

namespace fusedcomm {

enum class PeerStaging : int32_t {
  kNone = 0,      // the input already lives in a registered buffer: read it in place
  kInKernel = 1,  // the kernel copies the input into the registered buffer before meeting
  kCopy = 2,      // a device-to-device copy first (faster than 36 blocks copying, large inputs)
};

// Above this size a separate copy stages faster than the kernel's blocks do (measured).
constexpr int64_t kStageInKernelMaxBytes = 4 << 20;

struct PeerPlan {
  PeerAlgorithm algorithm;
  PeerStaging staging;
  int blocks;
  int64_t scratch_bytes;  // two-shot: bytes of scratch after the signal header it writes
};

// bytes: message size (a positive multiple of 16); requested: kPeerAuto, kPeerOneshot or
// kPeerTwoshot; staged: the input must be copied into a registered buffer first;
// scratch_capacity: bytes after the signal header of each rank's meta buffer.
inline PeerPlan plan_peer_all_reduce(int64_t bytes, int world, int64_t num_ctas,
                                     PeerAlgorithm requested, bool staged,
                                     int64_t scratch_capacity) {
  const int64_t packs = bytes / 16;
  const int64_t part = packs / world;
  const int64_t twoshot_scratch = (packs - part * (world - 1)) * 16;
  PeerAlgorithm algorithm = requested;
  if (algorithm == kPeerAuto) {
    // Two ranks: one-shot moves the same bytes with one meeting less (measured faster at every
    // size on 2x H200). More ranks: one-shot while small, as vLLM does.
    const bool small = (world <= 4 && bytes < 512 * 1024) || (world <= 8 && bytes < 256 * 1024);
    const bool fits = twoshot_scratch <= scratch_capacity;
    algorithm = (world == 2 || small || !fits) ? kPeerOneshot : kPeerTwoshot;
  }
  PeerStaging staging = PeerStaging::kNone;
  if (staged)
    staging = bytes <= kStageInKernelMaxBytes ? PeerStaging::kInKernel : PeerStaging::kCopy;
  const int64_t wanted = (packs + kPeerThreads - 1) / kPeerThreads;
  const int blocks = static_cast<int>(wanted < num_ctas ? wanted : num_ctas);
  return PeerPlan{algorithm, staging, blocks, algorithm == kPeerTwoshot ? twoshot_scratch : 0};
}

}  // namespace fusedcomm
