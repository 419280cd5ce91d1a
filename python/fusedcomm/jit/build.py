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
from .spec import JitSpec, gencode_flag, sm_name

COMMON_CUDA_FLAGS = (
    "-std=c++17",
    "-O3",
    "-Xcompiler=-fPIC",
    "-Xcompiler=-fvisibility=hidden",
    "--expt-relaxed-constexpr",
    "-lineinfo",
)


class BuildError(RuntimeError):
    """A module failed to compile; the message holds the compiler output."""


def find_nvcc() -> str:
    override = envs.nvcc_override()
    candidates = [override] if override else []
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
    out = subprocess.run([nvcc or find_nvcc(), "--version"], capture_output=True, text=True)
    if out.returncode != 0:
        raise BuildError(f"fusedcomm: '{nvcc} --version' failed: {out.stderr.strip()}")
    return out.stdout.strip().splitlines()[-1]


def _ninja_path() -> str:
    try:
        import ninja

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        found = shutil.which("ninja")
        if not found:
            raise BuildError("fusedcomm: ninja is missing (pip install ninja)") from None
        return found


def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def ninja_file(spec: JitSpec, arch: str, output: Path) -> str:
    includes = [str(spec.include_dir), str(spec.csrc_dir), *tvm_ffi_include_dirs()]
    cflags = [
        *COMMON_CUDA_FLAGS,
        gencode_flag(arch),
        *spec.cuda_cflags,
        *(f"-I{d}" for d in includes),
    ]
    ldflags = ["-shared", "-cudart=static", f"-L{tvm_ffi_lib_dir()}", "-ltvm_ffi", *spec.ldflags]
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
    build_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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


def build_into(spec: JitSpec, arch: str, dest: Path, build_root: Path) -> float | None:
    """Build ``spec`` and install it at ``dest`` atomically, once across processes.

    Several processes may ask at once: one holds the lock and builds, the others wait and
    find the finished file. Returns the build time, or None when another process built it.
    """
    dest, build_root = dest.resolve(), build_root.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with FileLock(str(dest) + ".lock"):
        if dest.exists():
            return None
        build_dir = build_root / f"{dest.stem}.build"
        tmp_output = build_dir / f"{spec.name}.so"
        elapsed = compile_spec(spec, arch, build_dir, tmp_output)
        staged = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(tmp_output, staged)
        os.chmod(staged, 0o700)
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staged, dest)
        return elapsed
