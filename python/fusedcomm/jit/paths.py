"""Where the CUDA sources, our headers and the TVM-FFI headers live."""

from __future__ import annotations

import functools
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = PACKAGE_DIR / "data"
CSRC_DIR = DATA_DIR / "csrc"
INCLUDE_DIR = DATA_DIR / "include"


@functools.cache
def tvm_ffi_include_dirs() -> tuple[str, ...]:
    import tvm_ffi.libinfo as info

    dirs = [info.find_include_path(), info.find_dlpack_include_path()]
    return tuple(dict.fromkeys(str(d) for d in dirs))


@functools.cache
def tvm_ffi_lib_dir() -> str:
    import tvm_ffi.libinfo as info

    return str(Path(info.find_libtvm_ffi()).parent)
