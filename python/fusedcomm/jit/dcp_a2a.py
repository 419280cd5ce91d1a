"""JIT spec of the decode context-parallel all-to-all family.

One module, ``dcp_a2a``, built per architecture from one unit (csrc/dcp_a2a.cu: the entry and
its one kernel). The kernel moves bytes, so nothing in it depends on the dtype, the CP size or
the row sizes: one build serves every configuration.
"""

from __future__ import annotations

import functools

from .spec import JitSpec, Unit


@functools.cache
def spec() -> JitSpec:
    return JitSpec(name="dcp_a2a", units=(Unit("dcp_a2a.cu"),))


def all_specs() -> list[JitSpec]:
    return [spec()]
