"""The mixed-communication kernel itself, on the CPU: include/fusedcomm/kernels/mixed_comm.cuh
compiled unchanged as host C++ (tests/mixed_comm_host/: the DCP emulation's CUDA stand-ins, plus
16-byte volatile accesses as 32-bit atomics and a host bf16) and run with every rank's blocks as
threads.

The ranks run unsynchronised through one long sequence of calls: every TP x DP split of 2 and 4
ranks, gather and scatter kinds, one and two rounds, from one pack to several rounds per block
(so the three slot buffers rotate and are cleared while peers run ahead), with poisoned outputs,
compared with the fp32 rank-order sums and across the TP ranks bit for bit; then a rank whose
peer never comes must record a timeout naming it, mark it, and do nothing at its next launch.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
INCLUDE = HERE.parent / "include"
SHIM = HERE / "mixed_comm_host"


def test_kernel_on_host_threads_matches_the_rank_order_sums(tmp_path):
    compiler = next((p for p in map(shutil.which, ("g++", "clang++")) if p), None)
    if compiler is None:
        pytest.skip("no host C++ compiler (g++ or clang++) on PATH")
    binary = tmp_path / "mixed_emulate"
    flags = ["-std=c++20", "-O1", "-pthread", "-include", str(SHIM / "prelude.h")]
    build = subprocess.run(
        [compiler, *flags, "-I", str(SHIM), "-I", str(INCLUDE), str(SHIM / "emulate.cpp"),
         "-o", str(binary)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if build.returncode != 0 and ("barrier" in build.stderr or "_Float16" in build.stderr):
        pytest.skip("the host compiler lacks C++20 <barrier> or _Float16")
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "failures 0" in run.stdout, out[-4000:]
    assert "world 2: 36 calls checked" in out and "world 4: 60 calls checked" in out
