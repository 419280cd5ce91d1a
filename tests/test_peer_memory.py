"""Tests for fusedcomm.runtime.peer_memory: the fd exchange, the collective creation (with a fake
driver on CPU) and the real VMM rows on GPUs."""

import itertools
import os
import socket
import struct

import pytest
import torch

from fusedcomm.jit.modules import RUNTIME
from fusedcomm.runtime import peer_memory
from fusedcomm.runtime.comm_backend import SoloBackend, TorchDistBackend
from fusedcomm.runtime.peer_memory import PeerMemory, exchange_fds
from fusedcomm.testing.dist import RankFailure, rank_device, run_ranks

# Time limits that only stop a hang, with room for a loaded 2-core machine: run_ranks counts from
# before the ranks start (over 30 s for three CPU ranks under load); the exchange's own limit
# counts from when every rank listens and stays below it, so a stuck exchange names its peer.
RANKS_TIMEOUT_S = 300
EXCHANGE_TIMEOUT_S = 120

# ----------------------------------------------------------------------------- CPU: arguments


def test_runtime_module_builds_peer_memory():
    assert "peer_memory.cu" in [u.source for u in RUNTIME.units]
    assert RUNTIME.host_only


@pytest.mark.parametrize(
    "size, exc, match",
    [
        (0, ValueError, r"size_per_rank \(0\) must be >= 1"),
        (-4096, ValueError, r"size_per_rank \(-4096\) must be >= 1"),
        (1.5, TypeError, "size_per_rank must be an int"),
        (True, TypeError, "size_per_rank must be an int"),
    ],
)
def test_bad_size_is_refused_before_any_work(size, exc, match):
    with pytest.raises(exc, match=match):
        PeerMemory(size, SoloBackend(), device=0)


def test_bad_device_backend_and_timeout():
    with pytest.raises(ValueError, match=r"device \(-1\) must be >= 0"):
        PeerMemory(4096, SoloBackend(), device=-1)
    with pytest.raises(TypeError, match="comm_backend must provide .* lacks .*allgather"):
        PeerMemory(4096, object(), device=0)
    with pytest.raises(ValueError, match=r"timeout_s \(0\) must be > 0"):
        PeerMemory(4096, SoloBackend(), device=0, timeout_s=0)
    with pytest.raises(ValueError, match=r"fd \(-1\) must be >= 0"):
        exchange_fds(-1, SoloBackend())


# ----------------------------------------------------------------------------- CPU: fd exchange


def _memfd(text: str) -> int:
    fd = os.memfd_create("fusedcomm-test")
    os.write(fd, text.encode())
    return fd


def _read(fd: int) -> str:
    return os.pread(fd, 64, 0).decode()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_exchange_on_one_rank_returns_nothing_to_close():
    fd = _memfd("solo")
    try:
        assert exchange_fds(fd, SoloBackend()) == [None]
        assert _read(fd) == "solo"  # still open, still the caller's
    finally:
        os.close(fd)


def _rank_exchange(rank, world_size):
    backend = TorchDistBackend()
    fd = _memfd(f"from rank {rank}")
    before = _open_fds()
    got = exchange_fds(fd, backend, timeout_s=EXCHANGE_TIMEOUT_S)
    assert got[rank] is None
    seen = {}
    for q, peer_fd in enumerate(got):
        if peer_fd is not None:
            seen[q] = _read(peer_fd)
            os.close(peer_fd)
    os.close(fd)
    assert _open_fds() == before - 1  # only the caller's own fd is gone
    return seen


@pytest.mark.parametrize("world", [2, 3])
def test_exchange_delivers_every_peer_fd(world):
    results = run_ranks(_rank_exchange, world, timeout_s=RANKS_TIMEOUT_S)
    for rank, seen in enumerate(results):
        assert seen == {q: f"from rank {q}" for q in range(world) if q != rank}


def _rank_exchange_bad_fd(rank, world_size):
    backend = TorchDistBackend()
    fd = _memfd(f"from rank {rank}")
    before = _open_fds()
    # rank 1 offers a descriptor that is not open: sending it fails, rank 0 never gets it
    try:
        exchange_fds(fd if rank == 0 else 1000, backend, timeout_s=EXCHANGE_TIMEOUT_S)
    except RuntimeError as exc:
        message = str(exc)
    else:
        message = None
    os.close(fd)
    return message, _open_fds() == before - 1


def test_exchange_failure_raises_on_every_rank_and_leaks_nothing():
    results = run_ranks(_rank_exchange_bad_fd, 2, timeout_s=RANKS_TIMEOUT_S)
    for message, no_leak in results:
        assert message is not None
        assert "exchange_fds: receiving the peers' fds failed (rank 0:" in message
        assert "rank 1 closed the connection without sending its fd" in message
        assert no_leak


def test_fetch_timeout_names_the_peer():
    token = "test-timeout-" + os.urandom(4).hex()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(peer_memory._socket_name(token, 1))
        listener.listen(1)  # never accepts: the connect succeeds, the answer never comes
        with pytest.raises(TimeoutError, match=r"rank 0 waited 0.3 s for rank 1 to send its fd"):
            peer_memory._fetch_fd(token, 0, 1, 0.3)


def test_fetch_from_missing_peer_names_it():
    token = "test-missing-" + os.urandom(4).hex()
    with pytest.raises(ConnectionError, match="rank 2 could not fetch rank 5's fd"):
        peer_memory._fetch_fd(token, 2, 5, 1.0)


def _stray(token, hello):
    """A process that is not a peer: connects, says ``hello`` (None: hangs up at once)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(peer_memory._socket_name(token, 0))
        if hello is None:
            return None
        client.sendall(hello)
        client.shutdown(socket.SHUT_WR)  # says no more: a short hello ends here
        client.settimeout(10)
        return client.recv(4)


def test_stray_connections_get_nothing_and_do_not_stop_the_server():
    token = "test-server-" + os.urandom(4).hex()
    fd = _memfd("served")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(peer_memory._socket_name(token, 0))
        listener.listen(4)
        server = peer_memory._FdServer(listener, fd, rank=0, world=3, timeout_s=60)
        server.start()
        # No valid rank, its own rank, too short a hello, nothing at all: each is hung up on
        # without an fd, and the server keeps serving.
        for hello in (struct.pack("<i", 7), struct.pack("<i", 0), b"\x01", None):
            assert _stray(token, hello) in (b"", None)
        got = peer_memory._fetch_fd(token, 1, 0, 30.0)
        assert _read(got) == "served"
        os.close(got)
        assert _stray(token, struct.pack("<i", 1)) == b""  # rank 1 again: already served
        got = peer_memory._fetch_fd(token, 2, 0, 30.0)
        assert _read(got) == "served"
        os.close(got)
        server.result(30)  # served both peers, no error
        assert len(server.strays) == 5, server.strays
        assert any("unexpected request from rank 7" in s for s in server.strays)
    os.close(fd)


def test_a_stray_in_the_middle_of_an_exchange_is_harmless():
    results = run_ranks(_rank_exchange_with_stray, 2, timeout_s=120)
    for rank, seen in enumerate(results):
        assert seen == {q: f"from rank {q}" for q in range(2) if q != rank}


def _rank_exchange_with_stray(rank, world_size):
    backend = TorchDistBackend()
    real_fetch = peer_memory._fetch_fd

    def fetch_after_a_stray(token, me, peer, timeout_s):
        # Before every real request, a process that says nothing valid knocks on the socket.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stray:
            stray.connect(peer_memory._socket_name(token, peer))
            stray.sendall(struct.pack("<i", -5))
            stray.settimeout(10)
            assert stray.recv(4) == b""
        return real_fetch(token, me, peer, timeout_s)

    peer_memory._fetch_fd = fetch_after_a_stray
    try:
        fd = _memfd(f"from rank {rank}")
        got = exchange_fds(fd, backend, timeout_s=30)
    finally:
        peer_memory._fetch_fd = real_fetch
    seen = {q: _read(peer_fd) for q, peer_fd in enumerate(got) if peer_fd is not None}
    for peer_fd in got:
        if peer_fd is not None:
            os.close(peer_fd)
    os.close(fd)
    return seen


def test_client_refuses_a_socket_of_another_user(monkeypatch):
    token = "test-uid-" + os.urandom(4).hex()
    monkeypatch.setattr(peer_memory, "_peer_uid", lambda sock: os.getuid() + 1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(peer_memory._socket_name(token, 1))
        listener.listen(1)  # a squatter on rank 1's name: the client must not even ask it
        with pytest.raises(PermissionError, match="socket of rank 1 belongs to a process of user"):
            peer_memory._fetch_fd(token, 0, 1, 5.0)


# ----------------------------------------------------------------------------- CPU: fake driver


class FakeRuntime:
    """The runtime module's peer_memory_* exports over memfds: an "allocation" is a memfd whose
    text names the device it was made on; a "mapping" records the rows' texts in order."""

    def __init__(self, fail: str | None = None):
        self.fail = fail
        self.ids = itertools.count(1)
        self.live: dict[int, str] = {}  # handle -> text
        self.mapped: list[str] = []
        self.unmapped = 0

    def _maybe_fail(self, step):
        if self.fail == step:
            raise RuntimeError(f"fake {step} failure")

    def peer_memory_granularity(self, device):
        return 4096

    def peer_memory_create(self, device, size):
        self._maybe_fail("create")
        assert size % 4096 == 0
        handle = next(self.ids)
        self.live[handle] = f"device {device}"
        return [handle, _memfd(self.live[handle])]

    def peer_memory_import(self, fd):
        self._maybe_fail("import")
        handle = next(self.ids)
        self.live[handle] = _read(fd)
        return handle

    def peer_memory_release(self, handles):
        for h in handles:
            del self.live[h]

    def peer_memory_map(self, device, handles, stride):
        self._maybe_fail("map")
        self.mapped = [self.live.pop(h) for h in handles]
        return 1 << 40

    def peer_memory_unmap(self, device, base, stride, world):
        assert base == 1 << 40
        self.unmapped += 1


@pytest.fixture
def fake_runtime(monkeypatch):
    fake = FakeRuntime()
    zeroed = []
    monkeypatch.setattr(peer_memory, "_runtime", lambda: fake)
    monkeypatch.setattr(peer_memory, "_zero_row", lambda *args: zeroed.append(args))
    fake.zeroed = zeroed
    return fake


def test_solo_creation_maps_zeroes_and_closes(fake_runtime):
    before = _open_fds()
    mem = PeerMemory(5000, SoloBackend(), device=3)
    assert (mem.rank, mem.world, mem.device) == (0, 1, 3)
    assert (mem.size_per_rank, mem.row_stride) == (5000, 8192)
    assert mem.base_ptr == mem.row_ptr(0) == 1 << 40
    assert fake_runtime.mapped == ["device 3"] and fake_runtime.live == {}
    assert fake_runtime.zeroed == [(1 << 40, 8192, 3)]
    assert _open_fds() == before
    with pytest.raises(ValueError, match=r"q \(1\) must be < world \(1\)"):
        mem.row_ptr(1)
    mem.close()
    mem.close()
    assert mem.closed and fake_runtime.unmapped == 1
    with pytest.raises(RuntimeError, match="PeerMemory.as_tensor: the memory is closed"):
        mem.as_tensor()


@pytest.mark.parametrize("step", ["create", "map"])
def test_solo_failure_releases_everything(fake_runtime, step):
    fake_runtime.fail = step
    before = _open_fds()
    with pytest.raises(
        RuntimeError, match=f"PeerMemory: .* failed \\(rank 0: RuntimeError: fake {step}"
    ):
        PeerMemory(4096, SoloBackend(), device=0)
    assert fake_runtime.live == {} and fake_runtime.unmapped == 0
    assert _open_fds() == before


def _rank_fake_creation(rank, world_size, failing_rank, step):
    fake = FakeRuntime(fail=step if rank == failing_rank else None)
    peer_memory._runtime = lambda: fake
    peer_memory._zero_row = lambda *args: None
    before = _open_fds()
    try:
        mem = PeerMemory(
            4096 * 3 - 1, TorchDistBackend(), device=rank, timeout_s=EXCHANGE_TIMEOUT_S
        )
    except RuntimeError as exc:
        return str(exc), fake.live, _open_fds() - before
    rows = list(fake.mapped)
    mem.close()
    return rows, fake.live, _open_fds() - before


def test_fake_creation_maps_every_rank_in_order():
    results = run_ranks(_rank_fake_creation, 3, timeout_s=RANKS_TIMEOUT_S, args=(None, None))
    for rows, live, leaked_fds in results:
        assert rows == ["device 0", "device 1", "device 2"]
        assert live == {} and leaked_fds == 0


@pytest.mark.parametrize("step", ["import", "map"])
def test_fake_failure_on_one_rank_raises_everywhere(step):
    results = run_ranks(_rank_fake_creation, 3, timeout_s=RANKS_TIMEOUT_S, args=(1, step))
    for message, live, leaked_fds in results:
        assert isinstance(message, str)
        assert f"(rank 1: RuntimeError: fake {step} failure)" in message
        assert live == {} and leaked_fds == 0


def test_ranks_must_agree_on_the_size():
    with pytest.raises(RankFailure, match="every rank must ask for the same size_per_rank"):
        run_ranks(_rank_sizes_differ, 2, timeout_s=RANKS_TIMEOUT_S)


def _rank_sizes_differ(rank, world_size):
    fake = FakeRuntime()
    peer_memory._runtime = lambda: fake
    PeerMemory(4096 * (rank + 1), TorchDistBackend(), device=rank)


# ----------------------------------------------------------------------------- GPU


def _pattern(q: int, n: int, device) -> torch.Tensor:
    return ((torch.arange(n, device=device, dtype=torch.int32) * 7 + 31 * q + 1) % 251).to(
        torch.uint8
    )


def _rank_peer_memory(rank, world_size, size):
    backend = TorchDistBackend()
    dev = rank_device()
    mem = PeerMemory(size, backend, device=dev.index)
    gran = int(peer_memory._runtime().peer_memory_granularity(dev.index))
    assert mem.row_stride % gran == 0 and size <= mem.row_stride < size + gran
    t = mem.as_tensor()
    assert t.shape == (world_size, size) and t.dtype == torch.uint8 and t.device == dev
    assert t.stride() == (mem.row_stride, 1)
    assert t.data_ptr() == mem.base_ptr
    assert [mem.row_ptr(q) for q in range(world_size)] == [
        mem.base_ptr + q * mem.row_stride for q in range(world_size)
    ]
    assert not t.any()  # every row starts zeroed

    t[rank].copy_(_pattern(rank, size, dev))
    torch.cuda.synchronize()
    backend.barrier()
    for q in range(world_size):
        assert torch.equal(t[q], _pattern(q, size, dev)), f"row {q} as read by rank {rank}"
    backend.barrier()

    # write the head of the next rank's row; the previous rank writes ours
    nxt, prev = (rank + 1) % world_size, (rank - 1) % world_size
    t[nxt, :64] = 100 + rank
    torch.cuda.synchronize()
    backend.barrier()
    assert torch.all(t[rank, :64] == 100 + prev)
    assert torch.equal(t[rank, 64:], _pattern(rank, size, dev)[64:])
    backend.barrier()

    del t
    mem.close()
    mem.close()
    assert mem.closed
    return mem.row_stride


@pytest.mark.gpu(2)
@pytest.mark.parametrize("size", [1 << 20, 3 * (1 << 21) + 100], ids=["1MiB", "odd"])
def test_peer_memory_rows_across_ranks(world_size, size):
    strides = run_ranks(_rank_peer_memory, world_size, backend="nccl", timeout_s=240, args=(size,))
    assert len(set(strides)) == 1
