"""Fakes of the device layer for the CPU tests of the fused all-reduce API."""

import pytest
import torch

import fusedcomm as comm
from fusedcomm.ops import _fusion_launch
from fusedcomm.runtime import fusion_control
from fusedcomm.runtime import fusion_workspace as fw

W, M, D = 2, 64, 256
BF16 = torch.bfloat16


# ------------------------------------------------------------------------------------------
# Fakes for the device layer


class FakeBackend:
    """A communicator whose peers all send what this rank sends (``hosts``: host names)."""

    def __init__(self, rank=0, size=W, hosts=None):
        self.rank, self.size, self.hosts, self.barriers = rank, size, hosts, 0
        self.Get_rank, self.Get_size = lambda: self.rank, lambda: self.size
        self.bcast, self.Split = lambda obj, root=0: obj, lambda color, key=0: self

    def allgather(self, obj):
        if self.hosts is not None and isinstance(obj, str):
            return list(self.hosts)
        return [obj] * self.size

    def barrier(self):
        self.barriers += 1


class Device:
    """Records what the workspace code asks of the device layer."""

    def __init__(self):
        self.next_ptr, self.fail_at = 1 << 32, None  # fail_at: "alloc2" or "control"
        self.live, self.freed, self.calls, self.launches, self.controls = [], [], [], [], []

    def create_shared_buffer(self, size, group=None, *, comm_backend=None):
        if self.fail_at == "alloc2" and len(self.live) == 1:
            raise RuntimeError("cudaMalloc: out of memory")
        ptrs = [self.next_ptr + (q << 40) for q in range(comm_backend.Get_size())]
        self.next_ptr += (size + 255) // 256 * 256
        self.live.append(tuple(ptrs))
        self.calls.append(("alloc", size))
        return ptrs

    def free_shared_buffer(self, ptrs, group=None, *, comm_backend=None):
        self.live.remove(tuple(ptrs))
        self.freed.append(tuple(ptrs))

    def new_control_block(self, device, segment_bytes, comm_bytes, timeout_s):
        if self.fail_at == "control":
            raise RuntimeError("control block allocation failed")
        c = Control()
        self.controls.append((c, segment_bytes, timeout_s))
        return c


class Control:
    ptr, closed, table = 0xC0DE00, False, None

    def attach(self, table):
        self.table = table

    def close(self):
        self.closed = True


def fake_plan(world_size, max_token_num, hidden_dim, dtype):
    elem = torch.tensor([], dtype=dtype).element_size()
    segment = min(world_size * max_token_num * hidden_dim * elem, comm.MAX_COMM_SIZE)
    return {
        "comm": 2 * world_size * max_token_num * hidden_dim * elem,
        "flags": world_size * 256 * 4,
        "lamport": 3 * segment,
        "segment": segment,
    }


@pytest.fixture
def dev(monkeypatch):
    d = Device()
    monkeypatch.setattr(fw, "create_shared_buffer", d.create_shared_buffer)
    monkeypatch.setattr(fw, "free_shared_buffer", d.free_shared_buffer)
    monkeypatch.setattr(fw, "_zero", lambda ptr, n: d.calls.append(("zero", ptr, n)))
    monkeypatch.setattr(
        fw,
        "trtllm_lamport_initialize",
        lambda ptr, n, dtype: d.calls.append(("lamport", ptr, n, dtype)),
    )
    monkeypatch.setattr(
        fw,
        "trtllm_lamport_initialize_all",
        lambda a, b, c, n, dtype: d.calls.append(("lamport_all", n)),
    )
    monkeypatch.setattr(fw, "_current_device", lambda: 0)
    monkeypatch.setattr(fw, "_table_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(fusion_control, "new_control_block", d.new_control_block)
    monkeypatch.setattr(fusion_control, "workspace_bytes", fake_plan)
    monkeypatch.setattr(_fusion_launch, "launch", d.launches.append)
    monkeypatch.setattr(_fusion_launch, "launch_moe", d.launches.append)
    return d


def make_ws(dtype=BF16, **kw):
    kw = {
        "world_size": W,
        "rank": 0,
        "max_token_num": M,
        "hidden_dim": D,
        "dtype": dtype,
        "comm_backend": FakeBackend(),
        "gpus_per_node": 8,
        **kw,
    }
    return comm.create_allreduce_fusion_workspace("trtllm", **kw)
