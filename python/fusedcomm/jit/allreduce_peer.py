"""JIT specs of the peer-to-peer (vLLM-style) all-reduce.

One host-only control module (handles, registration, planning) and one kernel module per
configuration: ``kernel_spec(dtype, world)``. The configuration is the module key, so the first
call of a configuration builds just that module (one small unit, seconds), and the control
module calls its launcher.
"""

from __future__ import annotations

import functools

from .configs import DTYPES, WORLDS, check_key
from .spec import JitSpec, Unit

# One-shot packs in flight per rank and thread: enough loads to cover NVLink latency without
# spilling registers (more ranks, more loads per pack).
ONESHOT_UNROLL = {2: 4, 4: 2, 8: 1, 0: 1}
# What engines use: built ahead of time by default.
DEFAULT_CONFIGS = tuple((d, w) for d in ("bf16", "f16") for w in (2, 4, 8))


@functools.cache
def control_spec() -> JitSpec:
    return JitSpec(
        name="allreduce_peer",
        units=(Unit("allreduce_peer.cu"), Unit("allreduce_peer_graph.cu")),
        host_only=True,
    )


@functools.cache
def kernel_spec(dtype: str, world: int, unroll: int | None = None) -> JitSpec:
    """The kernels of one configuration: ``dtype`` a key of DTYPES, ``world`` one of WORLDS.

    ``unroll`` (default ONESHOT_UNROLL[world]) is a tuning field: other values give modules of
    their own name (scripts/tune_allreduce.py times them side by side).
    """
    check_key("allreduce_peer", dtype, world)
    default = unroll is None or unroll == ONESHOT_UNROLL[world]
    unroll = ONESHOT_UNROLL[world] if unroll is None else unroll
    if unroll not in (1, 2, 4, 8):
        raise ValueError(f"allreduce_peer: unroll ({unroll}) must be 1, 2, 4 or 8")
    return JitSpec(
        name=f"allreduce_peer_{dtype}_w{world if world else 'any'}"
        + ("" if default else f"_u{unroll}"),
        units=(
            Unit(
                "allreduce_peer_kernels.cu",
                (f"FC_DTYPE={DTYPES[dtype][0]}", f"FC_WORLD={world}", f"FC_UNROLL={unroll}"),
            ),
        ),
        key=(("dtype", dtype), ("world", str(world)), ("unroll", str(unroll))),
    )


def all_specs() -> list[JitSpec]:
    return [control_spec(), *(kernel_spec(d, w) for d in DTYPES for w in WORLDS)]


def default_specs() -> list[JitSpec]:
    return [control_spec(), *(kernel_spec(d, w) for d, w in DEFAULT_CONFIGS)]
