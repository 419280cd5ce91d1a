"""Build or load CUDA modules ahead of serving, so no request waits for a compiler."""

from __future__ import annotations

from collections.abc import Iterable

from .jit import DEFAULT_SPECS, get_spec, load


def warmup(modules: str | Iterable[str] | None = None, arch: str | None = None) -> list[str]:
    """Load (building where needed) the named modules; returns their names.

    The default is every module engines use (the ahead-of-time set, DEFAULT_SPECS); name others
    (e.g. ``allreduce_peer_f32_w2``) to load them too.

    ``arch`` defaults to the current GPU's architecture ("9.0a" on H100/H200).
    """
    if isinstance(modules, str):
        modules = [modules]
    names = list(modules) if modules is not None else list(DEFAULT_SPECS)
    specs = [get_spec(n) for n in names]
    for spec in specs:
        load(spec, arch)
    return names
