"""JIT spec of the MoE all-to-all family (dispatch, combine, sanitize).

One module, ``moe_a2a``, built per architecture: the entry units (csrc/moe_a2a.cu; the
quantised combine outputs, kernels included, in csrc/moe_a2a_quant.cu; sanitize in
csrc/moe_a2a_sanitize.cu) and
``PARTS`` kernel units compiled in parallel (csrc/moe_a2a.h: part 0 dispatch and sanitize,
parts 1-3 the combine kernels of float16, bfloat16 and float32, part 4 the low-precision
wire). Nothing in it depends on the
world size or the payloads, so one build serves every configuration.
"""

from __future__ import annotations

import functools

from .spec import JitSpec, Unit

# Kernel units of the module (kMoeA2AParts in csrc/moe_a2a.h; describe() reports it and a test
# holds the two together).
PARTS = 5


@functools.cache
def spec() -> JitSpec:
    parts = tuple(Unit("moe_a2a_kernels.cu", (f"FC_PART={k}",)) for k in range(PARTS))
    return JitSpec(
        name="moe_a2a",
        units=(Unit("moe_a2a.cu"), Unit("moe_a2a_quant.cu"), Unit("moe_a2a_sanitize.cu"), *parts),
    )


def all_specs() -> list[JitSpec]:
    return [spec()]
