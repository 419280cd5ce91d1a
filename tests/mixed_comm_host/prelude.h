// What the mixed-communication kernel needs of CUDA on the host, on top of the DCP emulation's
// prelude (tests/dcp_a2a_host/prelude.h: threads, barriers, fences): __threadfence and
// make_uint4.
#pragma once
#include "../dcp_a2a_host/prelude.h"

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
