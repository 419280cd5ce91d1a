"""Build the prebuilt-kernel wheel: fusedcomm's modules, compiled ahead of time, for one CUDA major.

From the repository, in an environment with fusedcomm's build needs (torch, apache-tvm-ffi,
ninja, filelock) and nvcc:

    pip wheel --no-build-isolation --no-deps ./jit

The result is ``fusedcomm_jit_cache_cu<major>-<version>-py3-none-manylinux_<glibc>_<machine>.whl``:
- one wheel per CUDA major and platform: the modules are plain shared objects that do not
  depend on the Python version, so any Python 3 can install it;
- the CUDA major is part of the name (PyPI refuses local versions such as +cu13), and the
  version is fusedcomm's, with ``Requires-Dist: fusedcomm==<version>``;
- the manylinux tag is the newest glibc symbol version the modules need (at least 2.28, the
  oldest glibc CUDA 13 supports).

Variables:
- FUSEDCOMM_JIT_CACHE_FROM=DIR: package the modules already in DIR (the output of
  ``python -m fusedcomm.jit.aot --out DIR``) instead of building them;
- FUSEDCOMM_CUDA_ARCH_LIST: the targets to build when nothing is given (default "9.0a,10.0a");
- FUSEDCOMM_JIT_CACHE_CUDA: the CUDA version the modules were built with, e.g. "13.0"
  (default: asked from nvcc).
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON_SRC = ROOT / "python"
VERSION = re.search(
    r'__version__ = "([^"]+)"', (PYTHON_SRC / "fusedcomm" / "_version.py").read_text()
).group(1)
REQUIRES_PYTHON = re.search(
    r'requires-python = "([^"]+)"', (ROOT / "pyproject.toml").read_text()
).group(1)
MIN_GLIBC = (2, 28)


def cuda_version() -> str:
    given = os.environ.get("FUSEDCOMM_JIT_CACHE_CUDA")
    if given:
        return given
    nvcc = os.environ.get("FUSEDCOMM_NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(
            f"jit/setup.py: cannot ask {nvcc} for its version ({e}); "
            "set FUSEDCOMM_JIT_CACHE_CUDA, e.g. 13.0"
        )
    found = re.search(r"release (\d+)\.(\d+)", out)
    if not found:
        sys.exit(f"jit/setup.py: no 'release X.Y' in the output of {nvcc} --version")
    return f"{found.group(1)}.{found.group(2)}"


CUDA = cuda_version()
CUDA_MAJOR = CUDA.split(".")[0]


def collect_modules(dest: Path) -> None:
    """Fill ``dest`` with <arch>/<module>.so and manifest.json, and nothing else."""
    given = os.environ.get("FUSEDCOMM_JIT_CACHE_FROM")
    if given:
        source = Path(given).resolve()
    else:
        source = Path(tempfile.mkdtemp(prefix="fusedcomm-aot-"))
        archs = os.environ.get("FUSEDCOMM_CUDA_ARCH_LIST", "9.0a,10.0a").replace(" ", ",")
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(
                p for p in (str(PYTHON_SRC), os.environ.get("PYTHONPATH")) if p
            ),
        )
        subprocess.check_call(
            [sys.executable, "-m", "fusedcomm.jit.aot", "--arch", archs, "--out", str(source)],
            env=env,
        )
    manifest = json.loads((source / "manifest.json").read_text())
    if manifest.get("version") != VERSION:
        sys.exit(
            f"jit/setup.py: {source} holds modules of fusedcomm {manifest.get('version')}, "
            f"not {VERSION}"
        )
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for arch, modules in manifest.get("modules", {}).items():
        (dest / arch).mkdir()
        for name in modules:
            shutil.copyfile(source / arch / f"{name}.so", dest / arch / f"{name}.so")
    shutil.copyfile(source / "manifest.json", dest / "manifest.json")
    if not given:
        shutil.rmtree(source, ignore_errors=True)


def needed_glibc(folder: Path) -> tuple[int, int]:
    """The newest GLIBC_x.y symbol version any module in ``folder`` refers to."""
    newest = MIN_GLIBC
    for so in folder.rglob("*.so"):
        for major, minor in re.findall(rb"GLIBC_(\d+)\.(\d+)", so.read_bytes()):
            newest = max(newest, (int(major), int(minor)))
    return newest


class BuildWithKernels(build_py):
    def run(self):
        super().run()
        pkg = Path(self.build_lib) / "fusedcomm_jit_cache"
        (pkg / "_version.py").write_text(f'__version__ = "{VERSION}"\nCUDA_VERSION = "{CUDA}"\n')
        collect_modules(pkg / "modules")


class PlatformWheel(bdist_wheel):
    """Tag py3-none-manylinux_X_Y_<machine>: machine code, but no Python ABI in it."""

    def get_tag(self):
        modules = Path(self.bdist_dir) / "fusedcomm_jit_cache" / "modules"
        if not modules.is_dir():  # tags are asked before and after the build; both must agree
            modules = (
                Path(self.get_finalized_command("build_py").build_lib)
                / "fusedcomm_jit_cache"
                / "modules"
            )
        major, minor = needed_glibc(modules)
        return "py3", "none", f"manylinux_{major}_{minor}_{platform.machine()}"


class BinaryDistribution(Distribution):
    def has_ext_modules(self):
        return True


setup(
    name=f"fusedcomm-jit-cache-cu{CUDA_MAJOR}",
    version=VERSION,
    description=f"Prebuilt CUDA modules of fusedcomm for CUDA {CUDA_MAJOR}.x, so no compiler "
    "runs at first use",
    license="Apache-2.0",
    python_requires=REQUIRES_PYTHON,
    install_requires=[f"fusedcomm=={VERSION}"],
    packages=["fusedcomm_jit_cache"],
    package_data={"fusedcomm_jit_cache": ["modules/*/*.so", "modules/manifest.json"]},
    cmdclass={"build_py": BuildWithKernels, "bdist_wheel": PlatformWheel},
    distclass=BinaryDistribution,
    zip_safe=False,
)
