"""The DCP all-to-all kernel itself, on the CPU: include/fusedcomm/kernels/dcp_a2a.cuh compiled
unchanged as host C++ (tests/dcp_a2a_host/: CUDA's builtins as std::thread, std::barrier and
C++ atomics with the PTX wrappers' memory orders) and run with every rank's blocks as threads.

The ranks run unsynchronised, each a sequence of calls whose channel count changes and some of
which take several rounds per channel, with random bytes in and poisoned outputs, compared
byte for byte with the transpose; then a rank whose peer never comes must record a timeout on
that peer, mark it, and do nothing at its next launch. With FUSEDCOMM_TEST_TSAN=1 the program
is also built with ThreadSanitizer (slow), which checks that every byte a rank reads was
published to it by a release/acquire pair.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
INCLUDE = HERE.parent / "include"
SHIM = HERE / "dcp_a2a_host"


def _build_and_run(tmp_path: Path, extra: tuple[str, ...]) -> str:
    compiler = next((p for p in map(shutil.which, ("g++", "clang++")) if p), None)
    if compiler is None:
        pytest.skip("no host C++ compiler (g++ or clang++) on PATH")
    binary = tmp_path / "dcp_emulate"
    flags = ["-std=c++20", "-O1", "-pthread", "-include", str(SHIM / "prelude.h")]
    cmd = [compiler, *flags, *extra, "-I", str(SHIM), "-I", str(INCLUDE)]
    build = subprocess.run(
        [*cmd, str(SHIM / "emulate.cpp"), "-o", str(binary)], capture_output=True, text=True
    )
    if build.returncode != 0 and "barrier" in build.stderr and "No such file" in build.stderr:
        pytest.skip("the host compiler has no C++20 <barrier>")
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "failures 0" in run.stdout, (
        run.stdout[-4000:] + run.stderr[-4000:]
    )
    return run.stdout + run.stderr


def test_kernel_on_host_threads_matches_the_transpose(tmp_path):
    out = _build_and_run(tmp_path, ())
    for world in (1, 2, 3, 5):
        assert f"cp {world}: 7 calls checked" in out


@pytest.mark.skipif(os.environ.get("FUSEDCOMM_TEST_TSAN") != "1", reason="FUSEDCOMM_TEST_TSAN=1")
def test_kernel_on_host_threads_has_no_data_race(tmp_path):
    out = _build_and_run(tmp_path, ("-g", "-fsanitize=thread"))
    assert "ThreadSanitizer" not in out, out[-4000:]
