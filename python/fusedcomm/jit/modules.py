"""The JitSpec of every CUDA module fusedcomm ships; the one list AOT builds and doctor checks."""

from __future__ import annotations

from .spec import JitSpec, Unit

DTYPES = ("f32", "f16", "bf16")

RUNTIME = JitSpec(
    name="runtime",
    units=(Unit("runtime.cu"), Unit("lamport.cu")),
)

VLLM_AR = JitSpec(
    name="vllm_ar",
    units=(
        Unit("vllm_ar.cu"),
        Unit("vllm_ar_graph.cu"),
        *(Unit("vllm_ar_launch.cu", (f"FC_DTYPE={d}",)) for d in DTYPES),
    ),
)

ALL_SPECS: dict[str, JitSpec] = {s.name: s for s in (RUNTIME, VLLM_AR)}


def get_spec(name: str) -> JitSpec:
    try:
        return ALL_SPECS[name]
    except KeyError:
        known = ", ".join(sorted(ALL_SPECS))
        raise ValueError(f"unknown module {name!r}; known modules: {known}") from None
