"""Run a function on several local ranks, each in its own process.

:func:`run_ranks` is the one launcher the tests use. Every rank is a fresh
(spawned) process with ``torch.distributed`` initialised over a TCP store on
127.0.0.1. A failing rank, a rank that dies, or a rank that never finishes makes
the call raise in the parent; it never hangs the caller.

GPU ranks (``backend="nccl"``) are placed on GPU ``rank % visible``. When two ranks land on
one GPU (fewer GPUs than ranks, or ``FUSEDCOMM_TEST_SHARE_GPU=1``, which puts every rank on
GPU 0) the ranks *share* a GPU: NCCL refuses two ranks on one device, so the harness's own
process group is gloo instead, and the helpers below (:func:`barrier`, :func:`gather_all`,
:func:`all_reduce`) make the tests' reference collectives work under either backend. Two
processes on one GPU map each other's memory and their kernels time-slice, so every protocol
runs; timings from such ranks mean nothing.

:func:`mpirun_command` builds an ``mpiexec`` command line for tests that launch
ranks through MPI instead.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import os
import pickle
import queue as queue_mod
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp

__all__ = [
    "SHARE_GPU_ENV",
    "RankFailure",
    "RankTimeout",
    "all_reduce",
    "barrier",
    "find_mpirun",
    "gather_all",
    "gpu_placement",
    "mpirun_command",
    "rank_device",
    "ranks_share_gpu",
    "run_ranks",
    "same_on_every_rank",
    "visible_gpus",
]

# Every rank gets these; NVLink multicast stays off in all our tests.
_FORCED_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}

SHARE_GPU_ENV = "FUSEDCOMM_TEST_SHARE_GPU"  # "1": every GPU rank on GPU 0
_DEVICE_ENV = "FUSEDCOMM_TEST_RANK_DEVICE"  # set in each GPU rank: its CUDA device index
# Seconds: caps every run_ranks timeout, so one stuck test cannot use up a run's time budget.
MAX_TIMEOUT_ENV = "FUSEDCOMM_TEST_MAX_RANK_TIMEOUT_S"

_POLL_S = 0.2
_KILL_JOIN_S = 10.0


class RankFailure(RuntimeError):
    """One or more ranks raised or died.

    ``ranks`` lists the failing ranks; ``details`` maps each to its traceback
    (or to a note on how the process ended).
    """

    def __init__(self, details: dict[int, str]):
        self.ranks = sorted(details)
        self.details = dict(details)
        noun = "rank" if len(self.ranks) == 1 else "ranks"
        names = ", ".join(str(r) for r in self.ranks)
        parts = [f"run_ranks: {noun} {names} failed"]
        for r in self.ranks:
            parts.append(f"--- rank {r} ---\n{self.details[r].rstrip()}")
        super().__init__("\n".join(parts))


class RankTimeout(RuntimeError):
    """Some ranks were still running when the time limit ran out.

    ``ranks`` lists the ranks that had not finished.
    """

    def __init__(self, ranks: Sequence[int], timeout_s: float, what: str = "still running"):
        self.ranks = sorted(ranks)
        self.timeout_s = timeout_s
        noun = "rank" if len(self.ranks) == 1 else "ranks"
        names = ", ".join(str(r) for r in self.ranks)
        super().__init__(f"run_ranks: timed out after {timeout_s:g} s; {noun} {names} {what}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _timeout_cap() -> float:
    raw = os.environ.get(MAX_TIMEOUT_ENV, "")
    if not raw:
        return float("inf")
    try:
        cap = float(raw)
    except ValueError:
        cap = 0.0
    if not cap > 0:
        raise ValueError(f"run_ranks: {MAX_TIMEOUT_ENV}={raw!r} must be a number of seconds > 0")
    return cap


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _share_forced() -> bool:
    return os.environ.get(SHARE_GPU_ENV, "") not in ("", "0")


def gpu_placement(world_size: int, visible: int | None = None) -> tuple[int, ...]:
    """The CUDA device index of each GPU rank: ``rank % visible``, or 0 for every rank when
    ``FUSEDCOMM_TEST_SHARE_GPU=1``. Raises RuntimeError when no GPU is visible."""
    visible = visible_gpus() if visible is None else visible
    if visible < 1:
        raise RuntimeError("run_ranks: GPU ranks need a visible CUDA device, found none")
    if _share_forced():
        return (0,) * world_size
    return tuple(r % visible for r in range(world_size))


def ranks_share_gpu(world_size: int, visible: int | None = None) -> bool:
    """Whether ``world_size`` GPU ranks would put two ranks on one GPU here."""
    placement = gpu_placement(world_size, visible)
    return len(set(placement)) < len(placement)


def rank_device():
    """Inside a GPU rank: this rank's CUDA device (already made current by :func:`run_ranks`)."""
    import torch

    index = os.environ.get(_DEVICE_ENV)
    if index is None:
        raise RuntimeError("rank_device: not inside a GPU rank started by run_ranks")
    return torch.device("cuda", int(index))


def _init_process_group(
    rank: int, world_size: int, port: int, backend: str, timeout_s: float, device: int | None
):
    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=(rank == 0), timeout=timeout)
    kwargs: dict[str, Any] = {}
    if device is not None:
        torch.cuda.set_device(device)
    if backend == "nccl":
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = torch.device("cuda", device)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs
    )


def _rank_main(rank, world_size, port, backend, device, timeout_s, fn, args, env, results):
    """Body of one rank's process; reports ("ok", pickled value) or ("error", text)."""
    os.environ.update(env)
    if device is not None:
        os.environ[_DEVICE_ENV] = str(device)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import torch.distributed as dist

        _init_process_group(rank, world_size, port, backend, timeout_s, device)
        value = fn(rank, world_size, *args)
        try:
            payload = pickle.dumps(value)
        except Exception as exc:
            raise TypeError(
                f"run_ranks: rank {rank} returned a value that cannot be pickled "
                f"({type(value).__name__}): {exc}"
            ) from exc
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        results.close()
        results.join_thread()
        sys.exit(1)
    results.put((rank, "ok", payload))
    results.close()
    results.join_thread()


def _exit_note(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"process was killed by signal {-exitcode} before reporting"
    return f"process exited with code {exitcode} before reporting"


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(_KILL_JOIN_S)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    args: Sequence[Any] = (),
    env: dict[str, str] | None = None,
    may_die: Sequence[int] = (),
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes.

    Each process initialises ``torch.distributed`` with ``backend`` over a TCP
    store on 127.0.0.1, calls ``fn``, then destroys the process group. ``"nccl"`` asks for GPU
    ranks: each first selects its device from :func:`gpu_placement` (:func:`rank_device`
    returns it), and where ranks share a GPU the group is gloo instead (NCCL refuses two ranks
    on one device); the tests' collectives go through :func:`barrier`, :func:`gather_all` and
    :func:`all_reduce`, which work under both. ``fn`` and ``args`` must be
    picklable (``fn`` a module-level function). ``env`` adds environment
    variables for the ranks; NVLink multicast is always disabled
    (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``).
    Ranks listed in ``may_die`` may exit without reporting (their value is None): failure tests
    kill a rank on purpose.

    Returns the ranks' return values, indexed by rank; values must be
    picklable (plain objects or CPU tensors). Raises :class:`RankFailure` as
    soon as a rank raises or dies, and :class:`RankTimeout` if ranks are still
    running after ``timeout_s`` seconds; either way the remaining ranks are
    killed first.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"run_ranks: world_size must be an int, got {type(world_size).__name__}")
    if world_size < 1:
        raise ValueError(f"run_ranks: world_size ({world_size}) must be >= 1")
    if timeout_s <= 0:
        raise ValueError(f"run_ranks: timeout_s ({timeout_s}) must be > 0")
    timeout_s = min(timeout_s, _timeout_cap())
    child_env = {str(k): str(v) for k, v in (env or {}).items()}
    for name, value in _FORCED_ENV.items():
        if child_env.get(name, value) != value:
            raise ValueError(
                f"run_ranks: env may not set {name}={child_env[name]!r}; "
                f"NVLink multicast stays disabled ({name}={value})"
            )
    child_env.update(_FORCED_ENV)
    devices: tuple[int | None, ...] = (None,) * world_size
    if backend == "nccl":
        devices = gpu_placement(world_size)
        if len(set(devices)) < world_size:
            backend = "gloo"

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    deadline = time.monotonic() + timeout_s
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_rank_main,
                args=(
                    rank,
                    world_size,
                    port,
                    backend,
                    devices[rank],
                    timeout_s,
                    fn,
                    tuple(args),
                    child_env,
                    results,
                ),
                name=f"run_ranks-rank{rank}",
                daemon=False,  # a rank may start worker processes of its own
            )
            p.start()
            procs.append(p)
        values = _collect(procs, results, deadline, timeout_s, frozenset(may_die))
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0.0))
        lingering = [r for r, p in enumerate(procs) if p.is_alive()]
        if lingering:
            raise RankTimeout(lingering, timeout_s, "finished but did not exit")
        return values
    finally:
        _stop(procs)
        results.close()


def _collect(
    procs: list, results: Any, deadline: float, timeout_s: float, may_die: frozenset = frozenset()
) -> list:
    world_size = len(procs)
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}

    def take(message) -> None:
        rank, status, payload = message
        if status == "ok":
            values[rank] = pickle.loads(payload)
        else:
            failures[rank] = payload

    def drain(wait_s: float) -> None:
        end = time.monotonic() + wait_s
        while True:
            try:
                take(results.get(timeout=max(end - time.monotonic(), 0.01)))
            except queue_mod.Empty:
                return

    while len(values) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            running = [r for r in range(world_size) if r not in values]
            raise RankTimeout(running, timeout_s)
        try:
            take(results.get(timeout=min(remaining, _POLL_S)))
        except queue_mod.Empty:
            dead = [
                r
                for r, p in enumerate(procs)
                if not p.is_alive() and r not in values and r not in failures
            ]
            if dead:
                # A rank that exits flushes its report first; read what is in flight.
                drain(0.5)
                for r in dead:
                    if r in may_die and r not in values and r not in failures:
                        values[r] = None  # an expected death (a failure-protocol test)
                    elif r not in values and r not in failures:
                        failures[r] = _exit_note(procs[r].exitcode)
        if failures:
            # Other ranks often fail right after the first one; keep their reports too.
            drain(0.5)
            raise RankFailure(failures)
    return [values[r] for r in range(world_size)]


def find_mpirun() -> str | None:
    """Path of ``mpiexec``/``mpirun`` next to the interpreter, else on PATH, else None."""
    bindir = os.path.dirname(sys.executable)
    for name in ("mpiexec", "mpirun"):
        path = os.path.join(bindir, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    for name in ("mpiexec", "mpirun"):
        path = shutil.which(name)
        if path:
            return path
    return None


@functools.cache
def _is_open_mpi(launcher: str) -> bool:
    try:
        out = subprocess.run([launcher, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = out.stdout + out.stderr
    # Open MPI 5 prints "(Open MPI)"; 4.x prints "(OpenRTE)" and its bug-report address.
    return any(mark in text for mark in ("Open MPI", "OpenRTE", "open-mpi.org"))


def mpirun_command(n: int, argv: Sequence[str]) -> list[str]:
    """Command line that runs ``argv`` on ``n`` local MPI ranks.

    Uses the launcher found by :func:`find_mpirun`. For Open MPI (recognised
    from its ``--version`` text) it adds ``--oversubscribe`` and, when running
    as root, ``--allow-run-as-root``.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"mpirun_command: n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"mpirun_command: n ({n}) must be >= 1")
    launcher = find_mpirun()
    if launcher is None:
        raise FileNotFoundError(
            f"mpirun_command: no mpiexec or mpirun next to {sys.executable} or on PATH"
        )
    cmd = [launcher]
    if _is_open_mpi(launcher):
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        cmd.append("--oversubscribe")
    cmd += ["-n", str(n)]
    cmd += [str(a) for a in argv]
    return cmd


# ---------------------------------------------------------------------------------------------
# Inside ranks (torch.distributed initialised)


def _through_host(t) -> bool:
    """Whether a collective on ``t`` goes through host memory (gloo and a CUDA tensor)."""
    import torch.distributed as dist

    return t.is_cuda and dist.get_backend() == "gloo"


def barrier() -> None:
    """Every rank's queued GPU work is done, then all ranks meet (NCCL's barrier waits for
    the device, gloo's does not, so this synchronises first under either)."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    dist.barrier()


def gather_all(t):
    """Every rank's ``t`` (same shape and dtype everywhere), on ``t``'s device, by rank."""
    import torch.distributed as dist

    src = t.contiguous()
    if _through_host(src):
        return [p.to(t.device) for p in gather_all(src.cpu())]
    parts = [src.new_empty(src.shape) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, src)
    return parts


def all_reduce(t, op=None) -> None:
    """``dist.all_reduce`` of ``t`` in place (sum unless ``op``), under either backend."""
    import torch.distributed as dist

    op = dist.ReduceOp.SUM if op is None else op
    if _through_host(t):
        host = t.cpu()
        dist.all_reduce(host, op=op)
        t.copy_(host)
        return
    dist.all_reduce(t, op=op)


def same_on_every_rank(t) -> bool:
    """Whether every rank holds the same bits in ``t`` (compared as raw bytes)."""
    import torch

    raw = t.contiguous().view(torch.uint8)
    return all(torch.equal(raw, p) for p in gather_all(raw))
