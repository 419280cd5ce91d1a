"""Test-session setup: the world size of multi-rank tests and skip rules for ``gpu(n)`` / ``mpi``.

World size: every test that launches ranks takes the ``world_size`` fixture. It is 2 unless
``--world-size N`` (or the environment variable ``FUSEDCOMM_TEST_WORLD_SIZE=N``; the option
wins) says otherwise, so one switch runs the multi-GPU suite at 4 or 8 ranks on a host that
has the GPUs::

    python -m pytest -m gpu --world-size 8 tests

Skip rule: ``gpu(n)`` marks a test that needs at least ``n`` visible CUDA GPUs. A test that
also takes ``world_size`` needs ``max(n, world_size)`` of them (one GPU per rank), so a
multi-GPU test is written as ``@pytest.mark.gpu(2)`` plus the fixture and skips cleanly where
the chosen world size does not fit. ``mpi`` tests skip without mpi4py or an MPI launcher.

NVLink multicast is disabled for every process the tests start.
"""

import importlib.util
import os

import pytest

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

WORLD_SIZE_ENV = "FUSEDCOMM_TEST_WORLD_SIZE"
DEFAULT_WORLD_SIZE = 2


def _parse_world_size(text: str, source: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise pytest.UsageError(f"{source}: world size must be an integer, got {text!r}") from None
    if value < 2:
        raise pytest.UsageError(f"{source}: world size ({value}) must be >= 2")
    return value


def pytest_addoption(parser):
    parser.addoption(
        "--world-size",
        action="store",
        default=None,
        metavar="N",
        help=(
            f"ranks (one GPU each) for multi-rank tests; default ${WORLD_SIZE_ENV} "
            f"or {DEFAULT_WORLD_SIZE}"
        ),
    )


def configured_world_size(config) -> int:
    """The world size chosen by ``--world-size``, else the environment, else 2."""
    option = config.getoption("--world-size")
    if option is not None:
        return _parse_world_size(option, "--world-size")
    env = os.environ.get(WORLD_SIZE_ENV)
    if env:
        return _parse_world_size(env, WORLD_SIZE_ENV)
    return DEFAULT_WORLD_SIZE


def pytest_configure(config):
    config.fusedcomm_world_size = configured_world_size(config)  # validated once, up front


def pytest_report_header(config):
    return f"fusedcomm: multi-rank tests run at world size {config.fusedcomm_world_size}"


@pytest.fixture(scope="session")
def world_size(pytestconfig) -> int:
    """Ranks a multi-rank test launches: ``--world-size``, ``$FUSEDCOMM_TEST_WORLD_SIZE`` or 2."""
    return pytestconfig.fusedcomm_world_size


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


def gpus_needed(item, world: int) -> int | None:
    """GPUs a collected test needs (None without a ``gpu`` marker)."""
    marker = item.get_closest_marker("gpu")
    if marker is None:
        return None
    needed = marker.args[0] if marker.args else marker.kwargs.get("n", 1)
    if "world_size" in item.fixturenames:
        needed = max(needed, world)
    return needed


def pytest_collection_modifyitems(config, items):
    world = config.fusedcomm_world_size
    gpus = None
    mpi_missing = ...
    for item in items:
        needed = gpus_needed(item, world)
        if needed is not None:
            if gpus is None:
                gpus = _visible_gpus()
            if gpus < needed:
                why = f"needs {needed} CUDA GPU(s), {gpus} visible"
                if "world_size" in item.fixturenames:
                    why += f" (world size {world})"
                item.add_marker(pytest.mark.skip(reason=why))
        if item.get_closest_marker("mpi") is not None:
            if mpi_missing is ...:
                mpi_missing = _mpi_missing()
            if mpi_missing:
                item.add_marker(pytest.mark.skip(reason=mpi_missing))
