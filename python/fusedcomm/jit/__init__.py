"""The JitSpec layer: describe, build, cache and load fusedcomm's CUDA modules."""

from .build import BuildError
from .loader import (
    MissingModuleError,
    UnsafeModuleError,
    arch_for_capability,
    current_arch,
    load,
    locate,
)
from .modules import ALL_SPECS, DEFAULT_SPECS, get_spec
from .spec import JitSpec, Unit


def load_module(name: str, arch: str | None = None):
    """Load the module called ``name`` (building it on first use if needed)."""
    return load(get_spec(name), arch)


__all__ = [
    "ALL_SPECS",
    "DEFAULT_SPECS",
    "BuildError",
    "JitSpec",
    "MissingModuleError",
    "Unit",
    "UnsafeModuleError",
    "arch_for_capability",
    "current_arch",
    "get_spec",
    "load",
    "load_module",
    "locate",
]
