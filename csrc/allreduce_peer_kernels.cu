// allreduce_peer_<dtype>_w<world>: the one-shot and two-shot kernels of one configuration.
// JIT key (set by python/fusedcomm/jit/allreduce_peer.py): FC_DTYPE (a C++ type), FC_WORLD
// (2, 4, 8 or 0 = any), FC_UNROLL (one-shot packs in flight per rank and thread).
//   allreduce_peer_launcher() -> address of the PeerLauncher the control module calls
//   allreduce_peer_abi() -> kPeerAbi of the headers this module was built from
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "allreduce_peer_handle.h"
#include "fusedcomm/kernels/allreduce_oneshot.cuh"
#include "fusedcomm/kernels/allreduce_twoshot.cuh"

#if !defined(FC_DTYPE) || !defined(FC_WORLD) || !defined(FC_UNROLL)
#error "build through the JIT spec: FC_DTYPE, FC_WORLD and FC_UNROLL are its key fields"
#endif

namespace fusedcomm {
namespace {

cudaError_t launch(const AllReduceArgs& a, PeerAlgorithm algorithm, int blocks, cudaStream_t s) {
  if (algorithm == kPeerTwoshot) {
    allreduce_twoshot<FC_DTYPE, FC_WORLD><<<blocks, kPeerThreads, 0, s>>>(a);
  } else {
    allreduce_oneshot<FC_DTYPE, FC_WORLD, FC_UNROLL><<<blocks, kPeerThreads, 0, s>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace fusedcomm

FC_EXPORT_KERNEL_MODULE(allreduce_peer, PeerLauncher, kPeerAbi);
