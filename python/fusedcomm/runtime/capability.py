"""What the local GPUs, and the GPUs of a group of ranks, can do.

Backends are chosen from these reports:

* :func:`probe_local` describes one visible CUDA device (:class:`DeviceCaps`),
  asking the CUDA driver (``cuDeviceGetAttribute`` on ``libcuda.so.1``) and
  torch for peer access.
* :func:`probe_group` gathers every rank's report and reduces them with
  :func:`agree` to one :class:`GroupCaps` that is identical on every rank, so
  all ranks pick the same backend.
* :func:`p2p_matrix` and :func:`nvlink_matrix` describe the visible devices
  of this process.

Only attributes are queried. ``multicast_supported`` says whether the driver
reports NVLink SHARP multicast for a device; it is a capability report and
never enables, allocates or binds multicast memory by itself.
"""

from __future__ import annotations

import ctypes
import dataclasses
import socket
import threading
from collections.abc import Sequence
from typing import Any

__all__ = [
    "DeviceCaps",
    "GroupCaps",
    "agree",
    "nvlink_matrix",
    "p2p_matrix",
    "probe_group",
    "probe_local",
]

# CUdevice_attribute values (cuda.h).
_ATTR_SM_COUNT = 16  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
_ATTR_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
_ATTR_CC_MINOR = 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
_ATTR_VMM = 102  # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
_ATTR_POSIX_FD = 103  # CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED
_ATTR_FABRIC = 128  # CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED
_ATTR_MULTICAST = 132  # CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED

_CUDA_SUCCESS = 0
_CUDA_ERROR_INVALID_VALUE = 1  # an attribute this driver does not know

# NVML constants (nvml.h).
_NVML_P2P_CAPS_INDEX_READ = 0
_NVML_P2P_CAPS_INDEX_WRITE = 1
_NVML_P2P_CAPS_INDEX_NVLINK = 2
_NVML_P2P_STATUS_OK = 0
_NVML_NVLINK_MAX_LINKS = 18


@dataclasses.dataclass(frozen=True)
class DeviceCaps:
    """Capabilities of one CUDA device as seen by one process.

    ``index`` is the torch/CUDA device index inside this process.
    ``multicast_supported`` reports ``CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED``
    only; it does not enable multicast. ``peer_access`` lists, for the other
    GPUs this process can query, ``(pci_bus_id, can_access)``. ``pci_bus_id``
    is normalised to ``"dddd:bb:dd.f"`` in lower case.
    """

    index: int
    name: str
    compute_capability: tuple[int, int]
    sm_count: int
    fabric_handle_supported: bool
    multicast_supported: bool
    posix_fd_supported: bool
    vmm_supported: bool = False
    pci_bus_id: str = ""
    host: str = ""
    driver_version: int = 0
    peer_access: tuple[tuple[str, bool], ...] = ()


@dataclasses.dataclass(frozen=True)
class GroupCaps:
    """What every rank of a group can rely on.

    ``devices`` holds each rank's :class:`DeviceCaps` in rank order. The other
    fields are the common subset: the smallest compute capability and SM
    count, and each feature flag only when every rank reports it.
    ``peer_access`` is True when every ordered pair of ranks is on the same
    host and the first can access the second's device directly (ranks sharing
    one device count as accessible). ``multicast_supported`` is a report, not
    a switch: nothing here creates multicast objects.
    """

    world_size: int
    devices: tuple[DeviceCaps, ...]
    compute_capability: tuple[int, int]
    sm_count: int
    fabric_handle_supported: bool
    multicast_supported: bool
    posix_fd_supported: bool
    vmm_supported: bool
    single_host: bool
    peer_access: bool


def _normalize_bus_id(bus_id: Any) -> str:
    """``"00000000:3B:00.0"`` or ``"0000:3b:00.0"`` -> ``"0000:3b:00.0"``; "" if unparsable."""
    if isinstance(bus_id, bytes):
        bus_id = bus_id.decode("ascii", "replace")
    text = str(bus_id).strip().rstrip("\x00").lower()
    try:
        domain, bus, rest = text.split(":")
        dev, fn = rest.split(".")
        return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{int(fn, 16):x}"
    except ValueError:
        return ""


def _peer_ok(a: DeviceCaps, b: DeviceCaps) -> bool:
    if a.host != b.host:
        return False
    if a.pci_bus_id and a.pci_bus_id == b.pci_bus_id:
        return True
    if not b.pci_bus_id:
        return False
    return dict(a.peer_access).get(b.pci_bus_id, False)


def agree(caps_list: Sequence[DeviceCaps]) -> GroupCaps:
    """Reduce per-rank reports (in rank order) to the capabilities all ranks share.

    A pure function of its input: ranks that pass the same gathered list get
    equal results.
    """
    caps = tuple(caps_list)
    if not caps:
        raise ValueError("agree: caps_list must hold at least one DeviceCaps, got 0")
    for i, c in enumerate(caps):
        if not isinstance(c, DeviceCaps):
            raise TypeError(f"agree: caps_list[{i}] must be a DeviceCaps, got {type(c).__name__}")
    peer = all(_peer_ok(a, b) for i, a in enumerate(caps) for j, b in enumerate(caps) if i != j)
    return GroupCaps(
        world_size=len(caps),
        devices=caps,
        compute_capability=min(tuple(c.compute_capability) for c in caps),
        sm_count=min(c.sm_count for c in caps),
        fabric_handle_supported=all(c.fabric_handle_supported for c in caps),
        multicast_supported=all(c.multicast_supported for c in caps),
        posix_fd_supported=all(c.posix_fd_supported for c in caps),
        vmm_supported=all(c.vmm_supported for c in caps),
        single_host=len({c.host for c in caps}) == 1,
        peer_access=peer,
    )


# --------------------------------------------------------------------------
# CUDA driver (attribute queries only)


class _Driver:
    """The few driver calls the probe needs, through ctypes on libcuda.so.1."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise RuntimeError(
                f"probe_local: the CUDA driver library libcuda.so.1 could not be loaded ({exc})"
            ) from exc
        lib = self.lib
        lib.cuInit.argtypes = [ctypes.c_uint]
        lib.cuDriverGetVersion.argtypes = [ctypes.POINTER(ctypes.c_int)]
        lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.cuDeviceGetName.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        lib.cuDeviceGetPCIBusId.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        lib.cuDeviceGetAttribute.argtypes = [
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self._check("cuInit", lib.cuInit(0))

    def _check(self, name: str, status: int) -> None:
        if status == _CUDA_SUCCESS:
            return
        text = ctypes.c_char_p()
        if self.lib.cuGetErrorString(status, ctypes.byref(text)) == 0 and text.value:
            msg = text.value.decode("utf-8", "replace")
        else:
            msg = "unknown error"
        raise RuntimeError(f"probe_local: {name} failed: {msg} ({status})")

    def version(self) -> int:
        out = ctypes.c_int()
        self._check("cuDriverGetVersion", self.lib.cuDriverGetVersion(ctypes.byref(out)))
        return out.value

    def device(self, ordinal: int) -> int:
        out = ctypes.c_int()
        self._check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(out), ordinal))
        return out.value

    def name(self, dev: int) -> str:
        buf = ctypes.create_string_buffer(256)
        self._check("cuDeviceGetName", self.lib.cuDeviceGetName(buf, len(buf), dev))
        return buf.value.decode("utf-8", "replace")

    def bus_id(self, dev: int) -> str:
        buf = ctypes.create_string_buffer(64)
        self._check("cuDeviceGetPCIBusId", self.lib.cuDeviceGetPCIBusId(buf, len(buf), dev))
        return _normalize_bus_id(buf.value)

    def attribute(self, dev: int, attr: int, *, unknown_as: int | None = None) -> int:
        """One attribute; ``unknown_as`` is returned if this driver predates it."""
        out = ctypes.c_int()
        status = self.lib.cuDeviceGetAttribute(ctypes.byref(out), attr, dev)
        if status == _CUDA_ERROR_INVALID_VALUE and unknown_as is not None:
            return unknown_as
        self._check(f"cuDeviceGetAttribute({attr})", status)
        return out.value


_DRIVER: _Driver | None = None
_DRIVER_LOCK = threading.Lock()


def _driver() -> _Driver:
    global _DRIVER
    with _DRIVER_LOCK:
        if _DRIVER is None:
            _DRIVER = _Driver()
        return _DRIVER


def _visible_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except (RuntimeError, AssertionError):
        return 0


def _resolve_index(op: str, device: Any, count: int) -> int:
    import torch

    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if device.type != "cuda":
            raise ValueError(f"{op}: device ({device}) must be a CUDA device")
        index = torch.cuda.current_device() if device.index is None else device.index
    elif isinstance(device, bool) or not isinstance(device, int):
        raise TypeError(
            f"{op}: device must be None, an int, a str or a torch.device, "
            f"got {type(device).__name__}"
        )
    else:
        index = device
    if not 0 <= index < count:
        raise ValueError(f"{op}: device index ({index}) must be in [0, {count})")
    return index


def _nvml_peers(own_bus: str, known: set[str]) -> list[tuple[str, bool]]:
    """Peer access from ``own_bus`` to GPUs this process cannot see, through NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    out: list[tuple[str, bool]] = []
    try:
        handles = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            handles[_normalize_bus_id(pynvml.nvmlDeviceGetPciInfo(h).busId)] = h
        own = handles.get(own_bus)
        if own is None:
            return []
        for bus, h in sorted(handles.items()):
            if bus == own_bus or bus in known or not bus:
                continue
            ok = all(
                pynvml.nvmlDeviceGetP2PStatus(own, h, idx) == _NVML_P2P_STATUS_OK
                for idx in (_NVML_P2P_CAPS_INDEX_READ, _NVML_P2P_CAPS_INDEX_WRITE)
            )
            out.append((bus, ok))
    except Exception:
        return out
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


def probe_local(device: Any = None) -> DeviceCaps:
    """Describe one visible CUDA device (default: the current device).

    Raises ``RuntimeError`` when no CUDA device is visible or the driver
    cannot be loaded. Peer access is asked of torch for the other visible
    devices and, when ``pynvml`` is installed, of NVML for GPUs of this host
    that this process cannot see (for example under a per-rank
    ``CUDA_VISIBLE_DEVICES``).
    """
    op = "probe_local"
    count = _visible_count()
    if count == 0:
        raise RuntimeError(f"{op}: no CUDA device is visible to this process (torch sees 0)")
    index = _resolve_index(op, device, count)
    drv = _driver()
    dev = drv.device(index)
    bus = drv.bus_id(dev)

    import torch

    peers: list[tuple[str, bool]] = []
    for j in range(count):
        if j == index:
            continue
        other = drv.bus_id(drv.device(j))
        peers.append((other, bool(torch.cuda.can_device_access_peer(index, j))))
    known = {b for b, _ in peers} | {bus}
    peers.extend(_nvml_peers(bus, known))

    return DeviceCaps(
        index=index,
        name=drv.name(dev),
        compute_capability=(drv.attribute(dev, _ATTR_CC_MAJOR), drv.attribute(dev, _ATTR_CC_MINOR)),
        sm_count=drv.attribute(dev, _ATTR_SM_COUNT),
        fabric_handle_supported=bool(drv.attribute(dev, _ATTR_FABRIC, unknown_as=0)),
        multicast_supported=bool(drv.attribute(dev, _ATTR_MULTICAST, unknown_as=0)),
        posix_fd_supported=bool(drv.attribute(dev, _ATTR_POSIX_FD, unknown_as=0)),
        vmm_supported=bool(drv.attribute(dev, _ATTR_VMM, unknown_as=0)),
        pci_bus_id=bus,
        host=socket.gethostname(),
        driver_version=drv.version(),
        peer_access=tuple(peers),
    )


def p2p_matrix() -> list[list[bool]]:
    """``m[i][j]``: visible device ``i`` can access device ``j`` directly.

    The diagonal is True. Empty when no CUDA device is visible.
    """
    count = _visible_count()
    if count == 0:
        return []
    import torch

    return [
        [i == j or bool(torch.cuda.can_device_access_peer(i, j)) for j in range(count)]
        for i in range(count)
    ]


def nvlink_matrix() -> list[list[int]] | None:
    """``m[i][j]``: active NVLink links that visible device ``i`` can use to reach ``j``.

    Direct links to ``j`` are counted; when there are none but NVML reports
    NVLink peer-to-peer between the two (devices behind NVSwitches), the
    smaller of the two devices' counts of links to non-GPU endpoints is used.
    The diagonal is 0. ``None`` when ``pynvml`` is not installed or NVML
    cannot answer; empty when no CUDA device is visible.
    """
    try:
        import pynvml
    except ImportError:
        return None
    count = _visible_count()
    if count == 0:
        return []
    try:
        drv = _driver()
        buses = [drv.bus_id(drv.device(i)) for i in range(count)]
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        by_bus = {}
        for k in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(k)
            by_bus[_normalize_bus_id(pynvml.nvmlDeviceGetPciInfo(h).busId)] = h
        handles = [by_bus[b] for b in buses]
        direct = [[0] * count for _ in range(count)]
        other = [0] * count
        for i, h in enumerate(handles):
            for link in range(_NVML_NVLINK_MAX_LINKS):
                try:
                    if not pynvml.nvmlDeviceGetNvLinkState(h, link):
                        continue
                    remote = pynvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link)
                except pynvml.NVMLError:
                    continue
                remote_bus = _normalize_bus_id(remote.busId)
                if remote_bus in buses:
                    direct[i][buses.index(remote_bus)] += 1
                else:
                    other[i] += 1
        out = [[0] * count for _ in range(count)]
        for i in range(count):
            for j in range(count):
                if i == j:
                    continue
                if direct[i][j]:
                    out[i][j] = direct[i][j]
                elif other[i] and other[j]:
                    status = pynvml.nvmlDeviceGetP2PStatus(
                        handles[i], handles[j], _NVML_P2P_CAPS_INDEX_NVLINK
                    )
                    if status == _NVML_P2P_STATUS_OK:
                        out[i][j] = min(other[i], other[j])
        return out
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def probe_group(comm_backend: Any = None, group: Any = None) -> GroupCaps:
    """Probe this rank's current device and agree with the group; collective.

    Uses ``comm_backend`` if given, else a ``torch.distributed`` group
    (default WORLD). Each rank probes its current CUDA device, so select the
    device (``torch.cuda.set_device``) first. Every rank returns the same
    :class:`GroupCaps`. If any rank fails to probe, every rank raises
    ``RuntimeError`` naming the failing ranks, instead of leaving peers
    waiting.
    """
    from fusedcomm.runtime.comm_backend import resolve_backend

    backend = resolve_backend(comm_backend, group)
    local: DeviceCaps | None = None
    error: str | None = None
    try:
        local = probe_local()
    except Exception as exc:  # reported to every rank below
        error = f"{type(exc).__name__}: {exc}"
    gathered = backend.allgather((local, error))
    failures = [f"rank {r}: {err}" for r, (_, err) in enumerate(gathered) if err is not None]
    if failures:
        raise RuntimeError("probe_group: probing failed on " + "; ".join(failures))
    return agree([caps for caps, _ in gathered])
