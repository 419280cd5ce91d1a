"""JitSpec: what one CUDA module is made of, and the key that names its build.

A module is a set of compile units. Each unit is a source file under ``csrc/`` plus a few
preprocessor definitions, so one source can be compiled once per dtype into separate, small,
parallel translation units. The key hashes everything that can change the binary: the package
version, the module name, the target architecture, the flags, every unit and every header of
ours that a unit includes (followed transitively), and, for the JIT cache, the nvcc version.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import platform
import re
from pathlib import Path

from .paths import CSRC_DIR, INCLUDE_DIR

# Quoted and bracketed includes; only those found under our own folders count.
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+(?:"([^"]+)"|<([^>]+)>)', re.MULTILINE)

# Flags every module is compiled and linked with (the spec adds its own).
BASE_CUDA_FLAGS = (
    "-std=c++17",
    "-O3",
    "-Xcompiler=-fPIC",
    "-Xcompiler=-fvisibility=hidden",
    "--expt-relaxed-constexpr",
)


def cuda_flags() -> tuple[str, ...]:
    """BASE_CUDA_FLAGS, plus -lineinfo when FUSEDCOMM_LINEINFO=1 asks for source lines in
    profilers (it more than doubles the size of a kernel module, so builds leave it out by
    default; the flag is part of the module key, so such builds never mix with others)."""
    from .. import envs

    return (*BASE_CUDA_FLAGS, "-lineinfo") if envs.lineinfo() else BASE_CUDA_FLAGS


BASE_LDFLAGS = ("-shared", "-cudart=static", "-ltvm_ffi")


@functools.cache
def _toolchain_facts() -> tuple[str, ...]:
    """What else the binary depends on: the TVM-FFI it links against and the machine type."""
    try:
        from tvm_ffi import __version__ as tvm_ffi_version
    except ImportError:
        tvm_ffi_version = "missing"
    return (f"tvm_ffi={tvm_ffi_version}", f"machine={platform.machine()}")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One translation unit: a source under csrc/ and its -D definitions."""

    source: str
    defines: tuple[str, ...] = ()

    @property
    def object_name(self) -> str:
        stem = Path(self.source).stem
        suffix = "_".join(d.split("=", 1)[-1].lower() for d in self.defines)
        return f"{stem}_{suffix}.o" if suffix else f"{stem}.o"


# The architecture name under which host-only modules (no device code) are built and cached.
HOST_ARCH = "host"


@dataclasses.dataclass(frozen=True)
class JitSpec:
    """A named CUDA module: its compile units and extra flags.

    ``key`` holds the configuration fields the module was generated from (e.g. dtype and world
    size); they are already part of the units' definitions and so of the cache key. A
    ``host_only`` module has no device code: it is built once, for every architecture, under
    the name HOST_ARCH.
    """

    name: str
    units: tuple[Unit, ...]
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    csrc_dir: Path = CSRC_DIR
    include_dir: Path = INCLUDE_DIR
    key: tuple[tuple[str, str], ...] = ()
    host_only: bool = False

    def target(self, arch: str) -> str:
        """The architecture this module is built for when ``arch`` is asked for."""
        return HOST_ARCH if self.host_only else arch

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"JitSpec: name {self.name!r} must be lower_snake_case")
        if not self.units:
            raise ValueError(f"JitSpec {self.name}: needs at least one compile unit")
        objects = [u.object_name for u in self.units]
        if len(set(objects)) != len(objects):
            raise ValueError(f"JitSpec {self.name}: two units map to one object: {objects}")

    def source_paths(self) -> list[Path]:
        return [self.csrc_dir / u.source for u in self.units]

    def dependencies(self) -> list[Path]:
        """Every file of ours the build reads: the sources and their included headers."""
        return _collect_includes(self.source_paths(), self.include_dir, self.csrc_dir)

    def source_hash(self, arch: str) -> str:
        """Hash of everything but the compiler: used to check prebuilt modules."""
        h = hashlib.sha256()
        from .._version import __version__

        parts = (
            __version__,
            self.name,
            arch,
            *_toolchain_facts(),
            *cuda_flags(),
            "|",
            *self.cuda_cflags,
            "|",
            *BASE_LDFLAGS,
            "|",
            *self.ldflags,
        )
        for part in parts:
            h.update(part.encode() + b"\0")
        for unit in self.units:
            h.update(f"{unit.source}:{','.join(unit.defines)}".encode() + b"\0")
        for path in self.dependencies():
            h.update(_relative_name(path, (self.include_dir, self.csrc_dir)).encode() + b"\0")
            h.update(path.read_bytes())
        return h.hexdigest()

    def cache_key(self, arch: str, nvcc_version: str) -> str:
        h = hashlib.sha256(self.source_hash(arch).encode())
        h.update(nvcc_version.encode())
        return h.hexdigest()[:16]


def _relative_name(path: Path, roots: tuple[Path, ...]) -> str:
    for root in roots:
        try:
            return str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            continue
    return str(path)


def _collect_includes(sources: list[Path], include_dir: Path, csrc_dir: Path) -> list[Path]:
    seen: dict[Path, None] = {}
    stack = list(sources)
    while stack:
        path = stack.pop().resolve()
        if path in seen:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"JitSpec: missing source or header {path}")
        seen[path] = None
        for quoted, bracketed in _INCLUDE_RE.findall(path.read_text()):
            name = quoted or bracketed
            # nvcc's order: the including file's folder (quoted only), then -I include, -I csrc
            bases = (path.parent, include_dir, csrc_dir) if quoted else (include_dir, csrc_dir)
            for base in bases:
                candidate = base / name
                if candidate.is_file():
                    stack.append(candidate)
                    break
    return sorted(seen)


def gencode_flag(arch: str) -> str:
    """'9.0a' -> -gencode=arch=compute_90a,code=sm_90a; HOST_ARCH -> '' (no device code)."""
    if arch == HOST_ARCH:
        return ""
    m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", arch)
    if not m:
        raise ValueError(f"arch {arch!r} must look like '9.0a', '10.0a' or '8.0'")
    sm = f"{m.group(1)}{m.group(2)}{m.group(3)}"
    return f"-gencode=arch=compute_{sm},code=sm_{sm}"


def sm_name(arch: str) -> str:
    if arch == HOST_ARCH:
        return "the host (any GPU)"
    gencode_flag(arch)
    return "sm_" + arch.replace(".", "")
