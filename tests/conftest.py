"""Test-session setup: skip rules for the ``gpu(n)`` and ``mpi`` markers.

NVLink multicast is disabled for every process the tests start.
"""

import importlib.util
import os

import pytest

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mpi_missing() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return "needs mpi4py"
    from fusedcomm.testing.dist import find_mpirun

    if find_mpirun() is None:
        return "needs mpiexec or mpirun"
    return None


def pytest_collection_modifyitems(config, items):
    gpus = None
    mpi_missing = ...
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None:
            needed = marker.args[0] if marker.args else marker.kwargs.get("n", 1)
            if gpus is None:
                gpus = _visible_gpus()
            if gpus < needed:
                item.add_marker(pytest.mark.skip(
                    reason=f"needs {needed} CUDA GPU(s), {gpus} visible"))
        if item.get_closest_marker("mpi") is not None:
            if mpi_missing is ...:
                mpi_missing = _mpi_missing()
            if mpi_missing:
                item.add_marker(pytest.mark.skip(reason=mpi_missing))
