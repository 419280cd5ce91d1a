"""Every CUDA module fusedcomm can build: the one registry AOT builds, warmup loads and doctor
checks. Families generate their per-configuration specs (see allreduce_peer.py)."""

from __future__ import annotations

from . import allreduce_fusion, allreduce_peer, dcp_a2a, mixed_comm, moe_a2a
from .spec import JitSpec, Unit

# Failure records and peer-mapped (VMM) memory (host code only).
RUNTIME = JitSpec(
    name="runtime", units=(Unit("runtime.cu"), Unit("peer_memory.cu")), host_only=True
)

# The Lamport fill kernel.
LAMPORT = JitSpec(name="lamport", units=(Unit("lamport.cu"),))

# The dependent-launch probe of the PDL tests (fusedcomm.testing.pdl); not for engines.
PDL_PROBE = JitSpec(name="pdl_probe", units=(Unit("pdl_probe.cu"),))

ALL_SPECS: dict[str, JitSpec] = {
    s.name: s
    for s in (
        RUNTIME,
        LAMPORT,
        PDL_PROBE,
        *allreduce_peer.all_specs(),
        *allreduce_fusion.all_specs(),
        *moe_a2a.all_specs(),
        *dcp_a2a.all_specs(),
        *mixed_comm.all_specs(),
    )
}

# What engines use: the default set for warmup() and the AOT build.
DEFAULT_SPECS: dict[str, JitSpec] = {
    s.name: s
    for s in (
        RUNTIME,
        LAMPORT,
        *allreduce_peer.default_specs(),
        *allreduce_fusion.default_specs(),
        *moe_a2a.all_specs(),
        *dcp_a2a.all_specs(),
        *mixed_comm.all_specs(),
    )
}


def get_spec(name: str) -> JitSpec:
    try:
        return ALL_SPECS[name]
    except KeyError:
        known = ", ".join(sorted(ALL_SPECS))
        raise ValueError(f"unknown module {name!r}; known modules: {known}") from None
