"""Every environment variable fusedcomm reads, in one place.

Environment variables only carry deployment facts (where to cache, which architectures to
build for, default timeouts) and diagnostics. They never change numerics, and fusedcomm never
writes the user's environment.

| variable | meaning | default |
|---|---|---|
| FUSEDCOMM_CACHE_DIR | root of the JIT build cache | ~/.cache/fusedcomm |
| FUSEDCOMM_CUDA_ARCH_LIST | targets to build for when no GPU decides, e.g. "9.0a 10.0a" | the current GPU |
| FUSEDCOMM_AOT_DIR | a directory of modules built ahead of time (python -m fusedcomm.jit.aot) | unset |
| FUSEDCOMM_NO_JIT | "1": never start a compiler; a missing module raises MissingModuleError | 0 |
| FUSEDCOMM_QUIET_BUILD | "1": do not print build progress | 0 |
| FUSEDCOMM_BUILD_JOBS | parallel compile units for one build | number of CPUs |
| FUSEDCOMM_NVCC | the nvcc to use | nvcc on PATH, then $CUDA_HOME/bin/nvcc |
| FUSEDCOMM_TIMEOUT_S | default bound, in seconds, on every device-side wait for a peer | 30 |
"""

from __future__ import annotations

import os
from pathlib import Path


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    value = os.environ.get("FUSEDCOMM_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "fusedcomm"


def cuda_arch_list() -> list[str] | None:
    value = os.environ.get("FUSEDCOMM_CUDA_ARCH_LIST", "").replace(",", " ").replace(";", " ")
    archs = value.split()
    return archs or None


def aot_dir() -> Path | None:
    value = os.environ.get("FUSEDCOMM_AOT_DIR")
    return Path(value).expanduser() if value else None


def no_jit() -> bool:
    return _flag("FUSEDCOMM_NO_JIT")


def quiet_build() -> bool:
    return _flag("FUSEDCOMM_QUIET_BUILD")


def _number(name: str, value: str, kind):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} ({value!r}) must be a {kind.__name__}") from None


def build_jobs() -> int:
    value = os.environ.get("FUSEDCOMM_BUILD_JOBS")
    if value:
        jobs = _number("FUSEDCOMM_BUILD_JOBS", value, int)
        if jobs < 1:
            raise ValueError(f"FUSEDCOMM_BUILD_JOBS ({jobs}) must be >= 1")
        return jobs
    return max(1, len(os.sched_getaffinity(0)))


def nvcc_override() -> str | None:
    return os.environ.get("FUSEDCOMM_NVCC") or None


def default_timeout_s() -> float:
    value = _number("FUSEDCOMM_TIMEOUT_S", os.environ.get("FUSEDCOMM_TIMEOUT_S", "30"), float)
    if not value > 0:
        raise ValueError(f"FUSEDCOMM_TIMEOUT_S ({value}) must be > 0")
    return value
