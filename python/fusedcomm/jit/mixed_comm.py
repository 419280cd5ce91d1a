"""JIT spec of the mixed-communication family's fused unicast modes.

One module, ``mixed_comm``, built per architecture from one unit (csrc/mixed_comm.cu: the entry
and the kernel for fp16 / bf16, gather / scatter kinds, one or two rounds). The TP / DP split,
the local size and the sizes are runtime values, so one build serves every layout.
"""

from __future__ import annotations

import functools

from .spec import JitSpec, Unit


@functools.cache
def spec() -> JitSpec:
    return JitSpec(name="mixed_comm", units=(Unit("mixed_comm.cu"),))


def all_specs() -> list[JitSpec]:
    return [spec()]
