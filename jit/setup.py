"""Build the prebuilt-kernel wheel: run fusedcomm's AOT build and package its output.

Build in an environment that has fusedcomm's build needs (torch, apache-tvm-ffi, ninja,
filelock) and nvcc, without isolation, from the repository:

    pip wheel --no-build-isolation --no-deps ./jit

FUSEDCOMM_CUDA_ARCH_LIST picks the targets (default "9.0a,10.0a"). The version is fusedcomm's;
fusedcomm loads these modules only when the versions match and the source hashes agree.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PYTHON_SRC = HERE.parent / "python"
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (PYTHON_SRC / "fusedcomm" / "_version.py").read_text()).group(1)


class BuildWithKernels(build_py):
    def run(self):
        super().run()
        pkg = Path(self.build_lib) / "fusedcomm_jit_cache"
        (pkg / "_version.py").write_text(f'__version__ = "{VERSION}"\n')
        archs = os.environ.get("FUSEDCOMM_CUDA_ARCH_LIST", "9.0a,10.0a").replace(" ", ",")
        env = dict(os.environ, PYTHONPATH=str(PYTHON_SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.check_call([sys.executable, "-m", "fusedcomm.jit.aot", "--arch", archs,
                               "--out", str(pkg / "modules")], env=env)
        for junk in [*(pkg / "modules").rglob("*.lock")]:
            junk.unlink()
        build_dir = pkg / "modules" / ".build"
        if build_dir.exists():
            import shutil

            shutil.rmtree(build_dir)


class BinaryDistribution(Distribution):
    """The wheel holds machine code: tag it for this platform, not py3-none-any."""

    def has_ext_modules(self):
        return True


setup(version=VERSION, cmdclass={"build_py": BuildWithKernels}, distclass=BinaryDistribution,
      package_data={"fusedcomm_jit_cache": ["modules/*/*.so", "modules/manifest.json"]})
