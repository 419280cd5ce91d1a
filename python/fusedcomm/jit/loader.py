"""Find or build a module and load it through TVM-FFI.

Lookup order for a module and target architecture:
1. the prebuilt-kernel package ``fusedcomm_jit_cache`` (when installed at our version),
2. the directory named by FUSEDCOMM_AOT_DIR (``python -m fusedcomm.jit.aot --out DIR``),
3. the JIT cache (FUSEDCOMM_CACHE_DIR, default ~/.cache/fusedcomm),
4. a fresh build into the JIT cache (unless FUSEDCOMM_NO_JIT=1).

Prebuilt modules carry a manifest of source hashes; one that does not match the sources of this
installation is skipped, so a stale prebuilt module is never loaded.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import warnings
from pathlib import Path

from .. import envs
from .._logging import logger
from .._version import __version__
from ..envs import arch_for_capability
from .build import BuildError, build_into, find_nvcc, nvcc_version, private_dirs
from .spec import JitSpec

MANIFEST = "manifest.json"


class MissingModuleError(RuntimeError):
    """No prebuilt module fits, and building is switched off (FUSEDCOMM_NO_JIT=1)."""


class UnsafeModuleError(RuntimeError):
    """A module file is owned by another user or writable by group or others."""


def current_arch() -> str:
    """The target to load or build for: the current GPU, else FUSEDCOMM_CUDA_ARCH_LIST's first."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
        return arch_for_capability(major, minor)
    archs = envs.cuda_arch_list()
    if archs:
        return archs[0]
    raise RuntimeError(
        "fusedcomm: no CUDA GPU is visible and FUSEDCOMM_CUDA_ARCH_LIST is not set, so the "
        "target architecture is unknown"
    )


def check_safe(path: Path, *, trust_root: bool = False) -> None:
    """Refuse a file another user could have planted or changed."""
    st = path.stat()
    owners = {os.getuid(), 0} if trust_root else {os.getuid()}
    if st.st_uid not in owners:
        raise UnsafeModuleError(
            f"fusedcomm: refusing to load {path}: owned by uid {st.st_uid}, not by the current "
            f"user (uid {os.getuid()})"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeModuleError(
            f"fusedcomm: refusing to load {path}: writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o})"
        )


def _prebuilt_dirs() -> list[tuple[str, Path]]:
    found = []
    try:
        import fusedcomm_jit_cache as pkg

        if getattr(pkg, "__version__", None) == __version__:
            found.append(("prebuilt package", Path(pkg.MODULE_DIR)))
        else:
            warnings.warn(
                f"fusedcomm: fusedcomm-jit-cache {getattr(pkg, '__version__', '?')} does not "
                f"match fusedcomm {__version__}; ignoring it",
                stacklevel=3,
            )
    except ImportError:
        pass
    aot = envs.aot_dir()
    if aot is not None:
        found.append(("FUSEDCOMM_AOT_DIR", aot))
    return found


def _read_manifest(directory: Path) -> dict:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def find_prebuilt(spec: JitSpec, arch: str) -> Path | None:
    """A prebuilt module whose manifest hash matches this installation's sources, or None."""
    for label, directory in _prebuilt_dirs():
        path = directory / arch / f"{spec.name}.so"
        if not path.is_file():
            continue
        expected = _read_manifest(directory).get("modules", {}).get(arch, {}).get(spec.name)
        if expected != spec.source_hash(arch):
            warnings.warn(
                f"fusedcomm: {label} module {path} was built from other sources (or for another "
                f"machine or TVM-FFI); skipping it",
                stacklevel=3,
            )
            continue
        try:
            check_safe(path, trust_root=True)
        except UnsafeModuleError as e:
            warnings.warn(f"{e}; skipping it (chmod go-w {path.parent} to use it)", stacklevel=3)
            continue
        return path
    return None


def jit_cache_path(spec: JitSpec, arch: str) -> Path:
    key = spec.cache_key(arch, nvcc_version(find_nvcc()))
    return envs.cache_dir() / __version__ / arch / f"{spec.name}-{key}.so"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _cached_without_nvcc(spec: JitSpec, arch: str) -> Path | None:
    """With no compiler here, a cached module built from these very sources (any nvcc)."""
    folder = envs.cache_dir() / __version__ / arch
    wanted = spec.source_hash(arch)
    for side in sorted(folder.glob(f"{spec.name}-*.json")):
        try:
            if json.loads(side.read_text()).get("source_hash") == wanted:
                so = side.with_suffix(".so")
                if so.is_file():
                    return so
        except (OSError, ValueError):
            continue
    return None


def check_private_tree(root: Path, path: Path) -> None:
    """Every folder from ``root`` down to ``path``'s folder is ours and not group/world-writable."""
    folder = path.parent
    chain = [folder, *[p for p in folder.parents if root in (p, *p.parents)]]
    for d in chain:
        check_safe(d)


def locate(spec: JitSpec, arch: str, *, allow_build: bool = True) -> Path:
    """The path of a loadable module file for ``spec`` and ``arch``; builds it if needed."""
    arch = spec.target(arch)
    prebuilt = find_prebuilt(spec, arch)
    if prebuilt is not None:
        return prebuilt
    root = envs.cache_dir()
    try:
        dest = jit_cache_path(spec, arch)
    except BuildError:
        cached = _cached_without_nvcc(spec, arch)
        if cached is not None:
            check_private_tree(root, cached)
            check_safe(cached)
            return cached
        if envs.no_jit() or not allow_build:
            raise MissingModuleError(_missing_message(spec, arch)) from None
        raise
    if dest.exists():
        check_private_tree(root, dest)
        check_safe(dest)
        return dest
    if envs.no_jit() or not allow_build:
        raise MissingModuleError(_missing_message(spec, arch))
    private_dirs(dest.parent)
    check_private_tree(root, dest)
    build_into(spec, arch, dest, build_root=dest.parent / "build")
    side = _sidecar(dest)
    if not side.exists():
        tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps({"source_hash": spec.source_hash(arch), "nvcc": nvcc_version(find_nvcc())})
        )
        os.replace(tmp, side)
    check_safe(dest)
    return dest


def _missing_message(spec: JitSpec, arch: str) -> str:
    return (
        f"fusedcomm: module {spec.name} for {arch} is not prebuilt and building is off "
        f"(FUSEDCOMM_NO_JIT=1, or no nvcc). Add it to the prebuilt set: "
        f"python -m fusedcomm.jit.aot --arch {arch} --modules {spec.name}"
    )


_lock = threading.Lock()
_loaded: dict[tuple[str, str], object] = {}


def load(spec: JitSpec, arch: str | None = None):
    """Load ``spec`` as a TVM-FFI module (once per process and architecture).

    A host-only module needs no GPU and no architecture: the one build serves all.
    """
    arch = spec.target(arch or "") or current_arch()
    key = (spec.name, arch)
    module = _loaded.get(key)
    if module is not None:
        return module
    with _lock:
        module = _loaded.get(key)
        if module is None:
            import tvm_ffi

            path = locate(spec, arch)
            module = tvm_ffi.load_module(str(path))
            logger.info("loaded %s for %s from %s", spec.name, arch, path)
            _loaded[key] = module
    return module
