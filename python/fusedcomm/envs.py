"""Every environment variable fusedcomm reads, in one place.

Environment variables only carry deployment facts (where to cache, which architectures to
build for, default timeouts) and diagnostics. They never change numerics, and fusedcomm never
writes the user's environment.

| variable | meaning | default |
|---|---|---|
| FUSEDCOMM_CACHE_DIR | root of the JIT build cache | $XDG_CACHE_HOME/fusedcomm, else ~/.cache/fusedcomm |
| FUSEDCOMM_CUDA_ARCH_LIST | targets to build for when no GPU decides, e.g. "9.0a 10.0a" | TORCH_CUDA_ARCH_LIST, else the current GPU |
| FUSEDCOMM_AOT_DIR | a directory of modules built ahead of time (python -m fusedcomm.jit.aot) | unset |
| FUSEDCOMM_NO_JIT | "1": never start a compiler; a missing module raises MissingModuleError | 0 |
| FUSEDCOMM_QUIET_BUILD | "1": do not report builds (nor waits for another process's build) | 0 |
| FUSEDCOMM_LOGLEVEL | level of the "fusedcomm" logger: DEBUG, INFO, WARNING, ERROR or a number | see below |
| FUSEDCOMM_BUILD_JOBS | parallel compile units for one build | MAX_JOBS, else number of CPUs |
| FUSEDCOMM_NVCC | the nvcc to use | nvcc on PATH, then $CUDA_HOME/bin/nvcc |
| FUSEDCOMM_TIMEOUT_S | default bound, in seconds, on every device-side wait for a peer | 30 |
| FUSEDCOMM_LINEINFO | "1": build kernels with source-line information for profilers (larger modules, their own cache key) | 0 |

Standard variables users already set are honoured after ours:

| variable | used for | when |
|---|---|---|
| TORCH_CUDA_ARCH_LIST | the target list, e.g. "9.0;10.0+PTX" | FUSEDCOMM_CUDA_ARCH_LIST is unset; "9.0" and "10.0" become "9.0a" and "10.0a" as for a visible GPU, "+PTX" is ignored |
| MAX_JOBS | parallel compile units for one build | FUSEDCOMM_BUILD_JOBS is unset |
| XDG_CACHE_HOME | the cache root is $XDG_CACHE_HOME/fusedcomm | FUSEDCOMM_CACHE_DIR is unset (absolute paths only) |

Logging: everything goes through the ``fusedcomm`` logger (``logging.getLogger("fusedcomm")``).
Without FUSEDCOMM_LOGLEVEL it shows warnings only, except that the start and end of a kernel
build (and a wait for another process's build) are reported at INFO through
``fusedcomm.build``, and per-unit progress lines (``fusedcomm.build.progress``) only when stderr
is a terminal. FUSEDCOMM_LOGLEVEL sets one level for all of them. Records go to stderr unless
the application has configured logging itself (a handler on the root logger), in which case
they reach the application's handlers instead.
"""

from __future__ import annotations

import os
from pathlib import Path


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    value = os.environ.get("FUSEDCOMM_CACHE_DIR")
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says to ignore relative paths
        return Path(xdg) / "fusedcomm"
    return Path.home() / ".cache" / "fusedcomm"


def _split(value: str) -> list[str]:
    return value.replace(",", " ").replace(";", " ").split()


def arch_for_capability(major: int, minor: int) -> str:
    """SM90 -> '9.0a', SM100 -> '10.0a' (arch-specific features); others plain, e.g. '8.0'."""
    suffix = "a" if major in (9, 10) else ""
    return f"{major}.{minor}{suffix}"


def _torch_arch(entry: str) -> str:
    """A TORCH_CUDA_ARCH_LIST entry as our target name: "9.0" -> "9.0a", "8.6+PTX" -> "8.6"."""
    base = entry[:-4] if entry.upper().endswith("+PTX") else entry
    try:
        major, minor = (int(x) for x in base.rstrip("af").split("."))
    except ValueError:
        raise ValueError(
            f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not a compute capability such as 9.0; "
            "set FUSEDCOMM_CUDA_ARCH_LIST (e.g. 9.0a) instead"
        ) from None
    if base[-1] in "af":  # already names a feature set
        return base
    return arch_for_capability(major, minor)


def cuda_arch_list_source() -> str | None:
    """The variable the target list comes from, or None when neither is set."""
    for name in ("FUSEDCOMM_CUDA_ARCH_LIST", "TORCH_CUDA_ARCH_LIST"):
        if _split(os.environ.get(name, "")):
            return name
    return None


def cuda_arch_list() -> list[str] | None:
    """Targets from FUSEDCOMM_CUDA_ARCH_LIST, else from TORCH_CUDA_ARCH_LIST; None if unset."""
    source = cuda_arch_list_source()
    if source is None:
        return None
    entries = _split(os.environ[source])
    if source == "TORCH_CUDA_ARCH_LIST":
        entries = [_torch_arch(e) for e in entries]
    return list(dict.fromkeys(entries))  # keep order, drop repeats


def aot_dir() -> Path | None:
    value = os.environ.get("FUSEDCOMM_AOT_DIR")
    return Path(value).expanduser() if value else None


def no_jit() -> bool:
    return _flag("FUSEDCOMM_NO_JIT")


def quiet_build() -> bool:
    return _flag("FUSEDCOMM_QUIET_BUILD")


def lineinfo() -> bool:
    return _flag("FUSEDCOMM_LINEINFO")


def _number(name: str, value: str, kind):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} ({value!r}) must be a {kind.__name__}") from None


def build_jobs() -> int:
    for name in ("FUSEDCOMM_BUILD_JOBS", "MAX_JOBS"):
        value = os.environ.get(name, "").strip()
        if value:
            jobs = _number(name, value, int)
            if jobs < 1:
                raise ValueError(f"{name} ({jobs}) must be >= 1")
            return jobs
    return max(1, len(os.sched_getaffinity(0)))


_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "WARN": 30, "ERROR": 40, "CRITICAL": 50}


def log_level() -> int | None:
    """FUSEDCOMM_LOGLEVEL as a logging level, or None when unset."""
    value = os.environ.get("FUSEDCOMM_LOGLEVEL", "").strip()
    if not value:
        return None
    if value.upper() in _LEVELS:
        return _LEVELS[value.upper()]
    if value.isdigit():
        return int(value)
    raise ValueError(
        f"FUSEDCOMM_LOGLEVEL ({value!r}) must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL "
        "or a number"
    )


def nvcc_override() -> str | None:
    return os.environ.get("FUSEDCOMM_NVCC") or None


def default_timeout_s() -> float:
    value = _number("FUSEDCOMM_TIMEOUT_S", os.environ.get("FUSEDCOMM_TIMEOUT_S", "30"), float)
    if not value > 0:
        raise ValueError(f"FUSEDCOMM_TIMEOUT_S ({value}) must be > 0")
    return value
