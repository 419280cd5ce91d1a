"""Test-session setup: the world size of multi-rank tests and skip rules for ``gpu(n)`` / ``mpi``.

World size: every test that launches ranks takes the ``world_size`` fixture. It is 2 unless
``--world-size N`` (or the environment variable ``FUSEDCOMM_TEST_WORLD_SIZE=N``; the option
wins) says otherwise, so one switch runs the multi-GPU suite at 4 or 8 ranks on a host that
has the GPUs::

    python -m pytest -m gpu --world-size 8 tests

Skip rule: ``gpu(n)`` marks a test that needs ``n`` GPU ranks (``max(n, world_size)`` for a
test that also takes ``world_size``), not ``n`` GPUs: ranks go on GPU ``rank % visible``, so on
a one-GPU host every multi-rank test runs with ranks that *share* the GPU (their kernels
time-slice; correctness only). Such a test skips only where no GPU is visible.
``distinct_gpus`` marks a test that needs one GPU per rank by nature (P2P / NVLink matrices,
NCCL itself); it skips where the ranks would share a GPU, and under
``FUSEDCOMM_TEST_SHARE_GPU=1``, which forces every rank onto GPU 0. ``mpi`` tests skip without
mpi4py or an MPI launcher.

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
    world = config.fusedcomm_world_size
    line = f"fusedcomm: multi-rank tests run at world size {world}"
    gpus = _visible_gpus()
    if gpus and ranks_share_gpu(world, gpus):
        line += f"; ranks share GPU 0 ({gpus} visible): correctness only"
    return line


@pytest.fixture(scope="session")
def world_size(pytestconfig) -> int:
    """Ranks a multi-rank test launches: ``--world-size``, ``$FUSEDCOMM_TEST_WORLD_SIZE`` or 2."""
    return pytestconfig.fusedcomm_world_size


def _visible_gpus() -> int:
    from fusedcomm.testing.dist import visible_gpus

    return visible_gpus()


def ranks_share_gpu(world: int, gpus: int) -> bool:
    from fusedcomm.testing.dist import ranks_share_gpu as share

    return share(world, gpus)


def _mpi_missing() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return "needs mpi4py"
    from fusedcomm.testing.dist import find_mpirun

    if find_mpirun() is None:
        return "needs mpiexec or mpirun"
    return None


def gpus_needed(item, world: int) -> int | None:
    """GPU ranks a collected test needs (None without a ``gpu`` marker)."""
    marker = item.get_closest_marker("gpu")
    if marker is None:
        return None
    needed = marker.args[0] if marker.args else marker.kwargs.get("n", 1)
    if "world_size" in item.fixturenames:
        needed = max(needed, world)
    return needed


def skip_reason(item, world: int, gpus: int) -> str | None:
    """Why a GPU test cannot run with ``gpus`` visible (None: it runs)."""
    needed = gpus_needed(item, world)
    if needed is None:
        return None
    suffix = f" (world size {world})" if "world_size" in item.fixturenames else ""
    if gpus < 1:
        return f"needs a CUDA GPU for {needed} rank(s), none visible{suffix}"
    if item.get_closest_marker("distinct_gpus") is not None and ranks_share_gpu(needed, gpus):
        return f"needs {needed} distinct GPUs, {gpus} visible or ranks forced to share{suffix}"
    return None


def pytest_collection_modifyitems(config, items):
    world = config.fusedcomm_world_size
    gpus = None
    mpi_missing = ...
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            if gpus is None:
                gpus = _visible_gpus()
            why = skip_reason(item, world, gpus)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))
        if item.get_closest_marker("mpi") is not None:
            if mpi_missing is ...:
                mpi_missing = _mpi_missing()
            if mpi_missing:
                item.add_marker(pytest.mark.skip(reason=mpi_missing))
