"""What a plain `pip install` gets: every CUDA source and header ships; warmup loads modules."""

import fnmatch
import os
from pathlib import Path

import pytest

import fusedcomm
from fusedcomm.jit.paths import DATA_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_package_data_covers_every_source_and_header():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["fusedcomm"]
    files = [
        (Path(d) / f).relative_to(DATA_DIR.parent).as_posix()
        for d, _, names in os.walk(DATA_DIR, followlinks=True)  # data/ holds symlinks
        for f in names
    ]
    assert any(f.endswith(".cuh") for f in files) and any(f.endswith(".cu") for f in files)
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missing, f"not shipped in the wheel: {missing}"


SEED_API = [
    "CudaRTLibrary",
    "create_shared_buffer",
    "free_shared_buffer",
    "pack_strided_memory",
    "Mapping",
    "trtllm_lamport_initialize",
    "trtllm_lamport_initialize_all",
    "vllm_all_reduce",
    "vllm_dispose",
    "vllm_init_custom_ar",
    "vllm_register_buffer",
    "vllm_register_graph_buffers",
    "vllm_get_graph_buffer_ipc_meta",
    "vllm_meta_size",
    "mpi_barrier",
    "warmup",
]


@pytest.mark.parametrize("name", SEED_API)
def test_top_level_exposes_the_seed_api(name):
    assert callable(getattr(fusedcomm, name)), name


def test_comm_backends_import():
    from fusedcomm.runtime.comm_backend import CommBackend, MPIBackend, TorchDistBackend  # noqa: F401


def test_warmup_loads_every_module(monkeypatch):
    if not os.environ.get("FUSEDCOMM_AOT_DIR"):
        pytest.skip("needs FUSEDCOMM_AOT_DIR (scripts/test.sh builds it)")
    monkeypatch.setenv("FUSEDCOMM_NO_JIT", "1")
    from fusedcomm.jit import DEFAULT_SPECS

    names = fusedcomm.warmup(arch="9.0a")
    assert names == list(DEFAULT_SPECS)
    assert {"runtime", "lamport", "allreduce_peer", "allreduce_peer_bf16_w2"} <= set(names)
    with pytest.raises(ValueError, match="unknown module"):
        fusedcomm.warmup(["nope"], arch="9.0a")
