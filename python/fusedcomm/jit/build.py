"""Compile a JitSpec with nvcc through ninja: parallel units, progress lines, atomic install."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock

from .. import envs
from .paths import tvm_ffi_include_dirs, tvm_ffi_lib_dir
from .spec import BASE_CUDA_FLAGS, BASE_LDFLAGS, JitSpec, gencode_flag, sm_name



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
        *BASE_CUDA_FLAGS,
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


def _say(msg: str) -> None:
    if not envs.quiet_build():
        print(f"fusedcomm: {msg}", file=sys.stderr, flush=True)


def compile_spec(spec: JitSpec, arch: str, build_dir: Path, output: Path) -> float:
    """Run ninja for one module; returns the elapsed seconds. Raises BuildError on failure."""
    private_dirs(build_dir)
    (build_dir / "build.ninja").write_text(ninja_file(spec, arch, output))
    jobs = min(envs.build_jobs(), len(spec.units))
    n = len(spec.units)
    _say(f"building {spec.name} for {sm_name(arch)}: {n} compile unit(s), {jobs} in parallel")
    start = time.monotonic()
    env = dict(os.environ, NINJA_STATUS="[%f/%t] ")
    proc = subprocess.Popen(
        [_ninja_path(), "-C", str(build_dir), "-j", str(jobs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    log = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        log.append(line)
        if line.startswith("[") and "] " in line:
            status, what = line.split("] ", 1)
            if what != "link" and " " not in what:
                _say(f"  [{status[1:]}] {what} ({time.monotonic() - start:.1f} s)")
    if proc.wait() != 0:
        tail = "\n".join(log[-80:])
        raise BuildError(f"fusedcomm: building {spec.name} for {sm_name(arch)} failed:\n{tail}")
    elapsed = time.monotonic() - start
    _say(f"built {spec.name} for {sm_name(arch)} in {elapsed:.1f} s")
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


def build_into(spec: JitSpec, arch: str, dest: Path, build_root: Path) -> float | None:
    """Build ``spec`` and install it at ``dest`` atomically, once across processes.

    Several processes may ask at once: one holds the lock and builds, the others wait and
    find the finished file. Each build runs in a folder of its own (removed afterwards), so a
    builder killed mid-way cannot share object files with the next one. Returns the build
    time, or None when another process built it.
    """
    dest, build_root = dest.resolve(), build_root.resolve()
    private_dirs(dest.parent)
    with FileLock(str(dest) + ".lock"):
        if dest.exists():
            return None
        build_dir = build_root / f"{dest.stem}.{os.getpid()}.build"
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
        shutil.rmtree(build_dir, ignore_errors=True)
        return elapsed
