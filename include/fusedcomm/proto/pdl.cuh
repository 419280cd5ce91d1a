// Programmatic dependent launch, device side.
//
//   pdl_wait()     wait until the kernels this one depends on have completed and their
//                  writes are visible (griddepcontrol.wait); call before reading any input,
//                  workspace or control state.
//   pdl_trigger()  let the next kernel of the stream start its preamble
//                  (griddepcontrol.launch_dependents). It never lets that kernel read our
//                  outputs early: its own pdl_wait still waits for our completion.
// Both are no-ops when the kernel was launched without the PDL attribute, and below sm_90.
#pragma once

namespace fusedcomm {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace fusedcomm
