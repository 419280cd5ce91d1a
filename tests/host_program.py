"""Compile and run a small host C++ program against our headers (tests that hold a header and
its Python mirror together). CUDA qualifiers are defined away, so device-only helpers compile as
plain inline functions. Skips the calling test when no host compiler is on PATH."""

import shutil
import subprocess
from pathlib import Path

import pytest

INCLUDE = Path(__file__).resolve().parents[1] / "include"
_FLAGS = ("-std=c++17", "-x", "c++", "-D__host__=", "-D__device__=", "-D__forceinline__=inline")


def run_host_program(tmp_path: Path, name: str, source: str) -> str:
    """Build ``source`` as ``tmp_path/name`` with -I include/, run it, return its stdout."""
    compiler = next((p for p in map(shutil.which, ("g++", "c++", "clang++")) if p), None)
    if compiler is None:
        pytest.skip("no host C++ compiler (g++, c++ or clang++) on PATH to compile the header")
    src = tmp_path / f"{name}.cpp"
    src.write_text(source)
    binary = tmp_path / name
    subprocess.run(
        [compiler, *_FLAGS, "-I", str(INCLUDE), str(src), "-o", str(binary)],
        check=True,
        capture_output=True,
        text=True,
    )
    return subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
