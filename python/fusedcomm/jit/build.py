"""Compile a JitSpec with nvcc through ninja: parallel units, progress lines, atomic install."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .. import envs
from .._logging import build_logger, progress_logger
from .paths import tvm_ffi_include_dirs, tvm_ffi_lib_dir
from .spec import BASE_LDFLAGS, JitSpec, cuda_flags, gencode_flag, sm_name

WAIT_REPORT_S = 30.0  # while waiting for another process's build, say so this often


class BuildError(RuntimeError):
    """A module failed to compile; the message holds the compiler output."""


def find_nvcc() -> str:
    override = envs.nvcc_override()
    if override:
        if Path(override).is_file() and os.access(override, os.X_OK):
            return override
        raise BuildError(f"fusedcomm: FUSEDCOMM_NVCC ({override}) is not an executable file")
    candidates = []
    candidates.append(shutil.which("nvcc"))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise BuildError(
        "fusedcomm: nvcc was not found (looked at FUSEDCOMM_NVCC, PATH, CUDA_HOME, "
        "/usr/local/cuda). Install the CUDA toolkit, or install the prebuilt kernels "
        "(fusedcomm-jit-cache) or point FUSEDCOMM_AOT_DIR at modules built ahead of time."
    )


@functools.cache
def nvcc_version(nvcc: str | None = None) -> str:
    nvcc = nvcc or find_nvcc()
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    if out.returncode != 0:
        raise BuildError(f"fusedcomm: '{nvcc} --version' failed: {out.stderr.strip()}")
    return out.stdout.strip().splitlines()[-1]


def _ninja_path() -> str:
    try:
        import ninja

        bundled = Path(ninja.BIN_DIR) / "ninja"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("ninja")
    if not found:
        raise BuildError("fusedcomm: ninja is missing (pip install ninja)")
    return found


def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def ninja_file(spec: JitSpec, arch: str, output: Path) -> str:
    includes = [str(spec.include_dir), str(spec.csrc_dir), *tvm_ffi_include_dirs()]
    cflags = [
        *cuda_flags(),
        gencode_flag(arch),
        *spec.cuda_cflags,
        *(f"-I{d}" for d in includes),
    ]
    ldflags = [*BASE_LDFLAGS, f"-L{tvm_ffi_lib_dir()}", *spec.ldflags]
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {find_nvcc()}",
        f"cflags = {' '.join(cflags)}",
        f"ldflags = {' '.join(ldflags)}",
        "",
        "rule compile",
        "  command = $nvcc --generate-dependencies-with-compile --dependency-output $out.d "
        "$cflags $defines -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = $unit",
        "",
        "rule link",
        "  command = $nvcc $in $ldflags -o $out",
        "  description = link",
        "",
    ]
    objects = []
    for unit in spec.units:
        obj = unit.object_name
        objects.append(obj)
        source = _ninja_escape(str(spec.csrc_dir / unit.source))
        lines.append(f"build {obj}: compile {source}")
        lines.append(f"  defines = {' '.join('-D' + d for d in unit.defines)}")
        lines.append(f"  unit = {obj[:-2]}")
    lines.append(f"build {_ninja_escape(str(output))}: link {' '.join(objects)}")
    lines.append("")
    return "\n".join(lines)


def _say(msg: str, *args, progress: bool = False) -> None:
    if not envs.quiet_build():
        (progress_logger if progress else build_logger).info(msg, *args)


def compile_spec(spec: JitSpec, arch: str, build_dir: Path, output: Path) -> float:
    """Run ninja for one module; returns the elapsed seconds. Raises BuildError on failure."""
    private_dirs(build_dir)
    (build_dir / "build.ninja").write_text(ninja_file(spec, arch, output))
    jobs = min(envs.build_jobs(), len(spec.units))
    n = len(spec.units)
    target = sm_name(arch)
    _say("building %s for %s: %d compile unit(s), %d in parallel", spec.name, target, n, jobs)
    start = time.monotonic()
    env = dict(os.environ, NINJA_STATUS="[%f/%t] ")
    log = []
    units = {u.object_name[:-2] for u in spec.units}
    done = 0
    with subprocess.Popen(
        [_ninja_path(), "-C", str(build_dir), "-j", str(jobs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            log.append(line)
            if line.startswith("[") and "] " in line:
                what = line.split("] ", 1)[1]
                if what in units:  # count units ourselves: ninja's total includes the link
                    done += 1
                    _say(
                        "  [%d/%d] %s (%.1f s)",
                        done,
                        n,
                        what,
                        time.monotonic() - start,
                        progress=True,
                    )
    if proc.returncode != 0:
        tail = "\n".join(log[-80:])
        raise BuildError(f"fusedcomm: building {spec.name} for {target} failed:\n{tail}")
    elapsed = time.monotonic() - start
    _say("built %s for %s in %.1f s", spec.name, target, elapsed)
    return elapsed


def private_dirs(path: Path) -> None:
    """Create ``path`` and every missing parent with mode 0700 (not just the last level)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:  # a parent was removed as empty meanwhile: start over
            return private_dirs(path)


def _owner_file(dest: Path) -> Path:
    return dest.with_name(dest.name + ".building")


def _describe_owner(dest: Path) -> str:
    try:
        return "process " + _owner_file(dest).read_text().strip()
    except OSError:
        return "another process"


def _acquire(lock: FileLock, spec: JitSpec, arch: str, dest: Path) -> float | None:
    """Take ``lock``; if another process holds it, report the wait. Returns seconds waited."""
    try:
        lock.acquire(timeout=0)
        return None
    except Timeout:
        pass
    start = time.monotonic()
    _say(
        "waiting for %s for %s: %s is compiling it (lock %s)",
        spec.name,
        sm_name(arch),
        _describe_owner(dest),
        lock.lock_file,
    )
    while True:
        try:
            lock.acquire(timeout=WAIT_REPORT_S)
            return time.monotonic() - start
        except Timeout:
            _say(
                "still waiting for %s for %s (%.0f s so far)",
                spec.name,
                sm_name(arch),
                time.monotonic() - start,
            )


def _remove_empty_dirs(folder: Path, keep: Path) -> None:
    """Remove ``folder`` and its parents while empty, stopping at an ancestor of ``keep``."""
    while folder not in (keep, *keep.parents):
        try:
            folder.rmdir()
        except OSError:  # not empty (another build is using it) or already gone
            return
        folder = folder.parent


def build_into(spec: JitSpec, arch: str, dest: Path, build_root: Path) -> float | None:
    """Build ``spec`` and install it at ``dest`` atomically, once across processes.

    Several processes may ask at once: one holds the lock and builds, the others report that
    they wait (naming the builder) and find the finished file. Each build runs in a folder of
    its own under ``build_root``; afterwards, built or failed, only ``dest`` remains: the lock
    file, the owner note and the build folders (``build_root`` too, once empty) are removed.
    Returns the build time, or None when another process built it.
    """
    dest, build_root = dest.resolve(), build_root.resolve()
    private_dirs(dest.parent)
    lock = FileLock(str(dest) + ".lock")
    waited = _acquire(lock, spec, arch, dest)
    try:
        if dest.exists():
            if waited is not None:
                _say(
                    "%s for %s is ready (built by another process; waited %.1f s)",
                    spec.name,
                    sm_name(arch),
                    waited,
                )
            return None
        owner = _owner_file(dest)
        owner.write_text(f"{os.getpid()} on {socket.gethostname()}\n")
        build_dir = build_root / f"{dest.stem}.{os.getpid()}.build"
        try:
            if build_dir.exists():
                shutil.rmtree(build_dir)
            private_dirs(build_dir)
            tmp_output = build_dir / f"{spec.name}.so"
            elapsed = compile_spec(spec, arch, build_dir, tmp_output)
            staged = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            shutil.copyfile(tmp_output, staged)
            os.chmod(staged, 0o700)
            with open(staged, "rb") as f:
                os.fsync(f.fileno())
            os.replace(staged, dest)
        finally:  # a failed build's log tail is in the BuildError; nothing else is kept
            shutil.rmtree(build_dir, ignore_errors=True)
            owner.unlink(missing_ok=True)
            _remove_empty_dirs(build_root, dest.parent)
        return elapsed
    finally:
        # The lock file goes too. A process that opened it before this point and locks it
        # afterwards still finds ``dest`` on its second check; at worst two processes build
        # the same module at once, each in its own folder, and the atomic rename keeps one.
        Path(lock.lock_file).unlink(missing_ok=True)
        lock.release()
