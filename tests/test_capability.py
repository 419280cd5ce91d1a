"""Tests for fusedcomm.runtime.capability: local probes and the group agreement."""

import ctypes
import dataclasses
import pickle

import pytest
import torch

from fusedcomm.runtime import capability
from fusedcomm.runtime.capability import DeviceCaps, GroupCaps, agree, probe_group
from fusedcomm.runtime.comm_backend import SoloBackend
from fusedcomm.testing.dist import gpu_placement, rank_device, run_ranks

# run_ranks counts its limit from before the ranks start, which takes seconds on an idle 2-core
# machine and several times that on a loaded one: the CPU tests' limit only stops a hang.
RANKS_TIMEOUT_S = 300

BUS = [
    "0000:18:00.0",
    "0000:2a:00.0",
    "0000:3a:00.0",
    "0000:5d:00.0",
    "0000:9a:00.0",
    "0000:ab:00.0",
    "0000:ba:00.0",
    "0000:db:00.0",
]  # one per fake rank


def _caps(
    i,
    *,
    host="node0",
    cc=(9, 0),
    sm=132,
    fabric=False,
    mc=True,
    fd=True,
    vmm=True,
    peers=None,
    bus=None,
):
    """A synthetic H100-like report for GPU ``i`` that can reach every other GPU."""
    bus = BUS[i] if bus is None else bus
    if peers is None:
        peers = tuple((b, True) for b in BUS if b != bus)
    return DeviceCaps(
        index=i,
        name="NVIDIA H100 80GB HBM3",
        compute_capability=cc,
        sm_count=sm,
        fabric_handle_supported=fabric,
        multicast_supported=mc,
        posix_fd_supported=fd,
        vmm_supported=vmm,
        pci_bus_id=bus,
        host=host,
        driver_version=12080,
        peer_access=peers,
    )


# ----------------------------------------------------------------------------- agree()


def test_agree_uniform_group():
    caps = [_caps(i) for i in range(4)]
    g = agree(caps)
    assert isinstance(g, GroupCaps)
    assert g.world_size == 4 and g.devices == tuple(caps)
    assert g.compute_capability == (9, 0) and g.sm_count == 132
    assert g.multicast_supported and g.posix_fd_supported and g.vmm_supported
    assert not g.fabric_handle_supported
    assert g.single_host and g.peer_access


def test_agree_takes_the_minimum_capability():
    g = agree(
        [_caps(0, cc=(10, 0), sm=148), _caps(1, cc=(9, 0), sm=132), _caps(2, cc=(9, 10), sm=140)]
    )
    assert g.compute_capability == (9, 0)
    assert g.sm_count == 132
    # Lexicographic, not per component: (8, 9) < (9, 0).
    assert agree([_caps(0, cc=(9, 0)), _caps(1, cc=(8, 9))]).compute_capability == (8, 9)


@pytest.mark.parametrize(
    "field, kw",
    [
        ("multicast_supported", "mc"),
        ("fabric_handle_supported", "fabric"),
        ("posix_fd_supported", "fd"),
        ("vmm_supported", "vmm"),
    ],
)
def test_agree_feature_on_every_rank(field, kw):
    all_on = [_caps(i, **{kw: True}) for i in range(3)]
    assert getattr(agree(all_on), field) is True


@pytest.mark.parametrize(
    "field, kw",
    [
        ("multicast_supported", "mc"),
        ("fabric_handle_supported", "fabric"),
        ("posix_fd_supported", "fd"),
        ("vmm_supported", "vmm"),
    ],
)
@pytest.mark.parametrize("odd", range(3))
def test_agree_feature_missing_on_one_rank(field, kw, odd):
    mixed = [_caps(i, **{kw: i != odd}) for i in range(3)]
    assert getattr(agree(mixed), field) is False


def test_agree_peer_access_needs_every_ordered_pair():
    # GPU 1 cannot reach GPU 2 (one direction only): the group has no peer access.
    peers1 = tuple((b, b != BUS[2]) for b in BUS if b != BUS[1])
    g = agree([_caps(0), _caps(1, peers=peers1), _caps(2)])
    assert g.single_host and not g.peer_access
    # The same GPUs without GPU 2 are fine.
    assert agree([_caps(0), _caps(1, peers=peers1)]).peer_access


def test_agree_peer_access_unknown_peer_is_false():
    peers0 = tuple((b, True) for b in BUS[2:])  # rank 0 never saw GPU 1
    assert not agree([_caps(0, peers=peers0), _caps(1)]).peer_access
    assert not agree([_caps(0), _caps(1, bus="")]).peer_access


def test_agree_ranks_sharing_a_device_count_as_peers():
    g = agree([_caps(0, peers=()), _caps(0, peers=())])
    assert g.peer_access and g.world_size == 2


def test_agree_across_hosts():
    g = agree([_caps(0, host="a"), _caps(1, host="a"), _caps(0, host="b"), _caps(1, host="b")])
    assert not g.single_host and not g.peer_access
    assert g.multicast_supported  # still reported; choosing a backend is the caller's job


def test_agree_single_rank():
    g = agree([_caps(0, peers=(), fabric=True)])
    assert g.world_size == 1 and g.peer_access and g.single_host
    assert g.fabric_handle_supported


def test_agree_is_deterministic_and_picklable():
    caps = [_caps(i, mc=i != 2, cc=(9, i)) for i in range(4)]
    a, b = agree(caps), agree(list(pickle.loads(pickle.dumps(caps))))
    assert a == b and hash(a) == hash(b)
    assert pickle.loads(pickle.dumps(a)) == a
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.multicast_supported = True


def test_agree_argument_errors():
    with pytest.raises(ValueError, match=r"agree: caps_list .* got 0"):
        agree([])
    with pytest.raises(TypeError, match=r"agree: caps_list\[1\] must be a DeviceCaps, got dict"):
        agree([_caps(0), {"index": 1}])


@pytest.mark.parametrize(
    "raw, want",
    [
        ("00000000:3B:00.0", "0000:3b:00.0"),
        (b"0000:3b:00.0\x00", "0000:3b:00.0"),
        ("0001:0A:1f.3", "0001:0a:1f.3"),
        ("garbage", ""),
    ],
)
def test_normalize_bus_id(raw, want):
    assert capability._normalize_bus_id(raw) == want


# ----------------------------------------------------------------------------- no GPU here


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_probes_without_cuda():
    with pytest.raises(RuntimeError, match="probe_local: no CUDA device is visible"):
        capability.probe_local()
    assert capability.p2p_matrix() == []
    assert capability.nvlink_matrix() in (None, [])


def test_probe_group_with_given_backend(monkeypatch):
    mine = _caps(1, cc=(9, 0), mc=False)
    monkeypatch.setattr(capability, "probe_local", lambda device=None: mine)
    g = probe_group(comm_backend=SoloBackend())
    assert g == agree([mine])


def test_probe_group_reports_local_failure(monkeypatch):
    def broken(device=None):
        raise RuntimeError("probe_local: no CUDA device is visible")

    monkeypatch.setattr(capability, "probe_local", broken)
    with pytest.raises(RuntimeError, match=r"probe_group: probing failed on rank 0: Runtime"):
        probe_group(comm_backend=SoloBackend())


# ----------------------------------------------------------------------------- ranks (gloo)


def _fake_report(rank):
    return _caps(
        rank,
        cc=(9, 0) if rank == 0 else (10, 0),
        sm=132 + 16 * rank,
        mc=True,
        fabric=rank == 1,
        fd=True,
    )


def _rank_probe_group_fake(rank, world_size):
    capability.probe_local = lambda device=None: _fake_report(rank)
    return probe_group()


def test_probe_group_ranks_with_fake_devices(world_size):
    results = run_ranks(_rank_probe_group_fake, world_size, timeout_s=RANKS_TIMEOUT_S)
    want = agree([_fake_report(r) for r in range(world_size)])
    assert results == [want] * world_size
    assert want.world_size == world_size
    assert want.compute_capability == (9, 0) and want.sm_count == 132
    assert want.multicast_supported and not want.fabric_handle_supported
    assert want.peer_access


def _rank_probe_group_one_fails(rank, world_size):
    def probe(device=None):
        if rank == 1:
            raise RuntimeError("probe_local: no CUDA device is visible (fake)")
        return _fake_report(rank)

    capability.probe_local = probe
    try:
        probe_group()
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_probe_group_failure_reaches_every_rank(world_size):
    messages = run_ranks(_rank_probe_group_one_fails, world_size, timeout_s=RANKS_TIMEOUT_S)
    wrong = [
        (rank, text)
        for rank, text in enumerate(messages)
        if not text.startswith("probe_group: probing failed on rank 1: RuntimeError")
        or "rank 0" in text
    ]
    assert not wrong, f"ranks whose error does not name rank 1 alone: {wrong}"


# ----------------------------------------------------------------------------- GPU

# Feature flags and the CUdevice_attribute that reports each, as numbered in cuda.h. The test
# asks the driver itself, so a probe that reads the wrong attribute or mixes up fields fails.
DRIVER_FLAGS = {
    "vmm_supported": 102,  # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
    "posix_fd_supported": 103,  # CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED
    "fabric_handle_supported": 128,  # CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED
    "multicast_supported": 132,  # CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED
}


def _driver_flags(index):
    """The feature flags of CUDA device ``index``, read from libcuda with plain ctypes."""
    lib = ctypes.CDLL("libcuda.so.1")
    assert lib.cuInit(0) == 0
    dev, value = ctypes.c_int(), ctypes.c_int()
    assert lib.cuDeviceGet(ctypes.byref(dev), index) == 0
    flags = {}
    for field, attr in DRIVER_FLAGS.items():
        value.value = -1
        status = lib.cuDeviceGetAttribute(ctypes.byref(value), attr, dev)
        # CUDA_ERROR_INVALID_VALUE (1): a driver older than the attribute, so not supported.
        assert status in (0, 1), f"cuDeviceGetAttribute({attr}) for {field} returned {status}"
        assert status == 1 or value.value in (0, 1), f"{field}: attribute value {value.value}"
        flags[field] = status == 0 and value.value == 1
    return flags


def _flags_of(caps):
    return {field: getattr(caps, field) for field in DRIVER_FLAGS}


def _rank_probe_group_real(rank, world_size):
    g = probe_group()
    dev = rank_device().index
    props = torch.cuda.get_device_properties(dev)
    mine = g.devices[rank]
    assert mine.index == dev
    assert mine.compute_capability == (props.major, props.minor)
    assert mine.sm_count == props.multi_processor_count
    assert mine.name == props.name
    assert mine == capability.probe_local(dev)
    assert _flags_of(mine) == _driver_flags(dev)
    assert capability.p2p_matrix()[dev][dev] is True
    return g


@pytest.mark.gpu(2)
def test_probe_group_real_gpus_agree(world_size):
    results = run_ranks(_rank_probe_group_real, world_size, backend="nccl", timeout_s=120)
    assert results == [results[0]] * world_size
    g = results[0]
    place = gpu_placement(world_size)  # ranks may share a GPU: they then report one bus id
    assert g.world_size == world_size and g.single_host
    assert len({d.pci_bus_id for d in g.devices}) == len(set(place))
    assert g.compute_capability == min(d.compute_capability for d in g.devices)
    p2p = capability.p2p_matrix()
    assert len(p2p) >= len(set(place))
    pairs = [(place[a], place[b]) for a in range(world_size) for b in range(world_size) if a != b]
    assert g.peer_access == all(a == b or p2p[a][b] for a, b in pairs)
    # Each rank checked its own flags against the driver; the group needs them on every rank.
    for field in DRIVER_FLAGS:
        assert getattr(g, field) == all(getattr(d, field) for d in g.devices), field
    assert g.multicast_supported == all(
        _driver_flags(place[r])["multicast_supported"] for r in range(world_size)
    )


@pytest.mark.gpu(1)
def test_probe_local_matches_torch():
    caps = capability.probe_local()
    props = torch.cuda.get_device_properties(caps.index)
    assert caps.compute_capability == torch.cuda.get_device_capability(caps.index)
    assert caps.sm_count == props.multi_processor_count
    assert _flags_of(caps) == _driver_flags(caps.index)
    # Exporting to a file descriptor and multicast objects are both built on VMM allocations.
    assert caps.vmm_supported or not (caps.posix_fd_supported or caps.multicast_supported)
    assert len(caps.pci_bus_id.split(":")) == 3
    with pytest.raises(ValueError, match=r"probe_local: device index \(99\)"):
        capability.probe_local(99)
    with pytest.raises(ValueError, match="must be a CUDA device"):
        capability.probe_local("cpu")
    matrix = capability.nvlink_matrix()
    if matrix is not None:
        n = torch.cuda.device_count()
        assert len(matrix) == n and all(row[i] == 0 for i, row in enumerate(matrix))
