"""Turn a kernel's failure record into a Python exception.

A kernel that gives up waiting for a peer fills a FailureRecord (include/fusedcomm/common/
status.cuh) in pinned host memory and returns, so the CUDA context stays usable. The frontends
call ``check_device(device)`` before each launch, which reads the record without synchronising;
``check_errors()`` synchronises first, so it also catches a failure of the last launch.
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading

from ..jit.paths import INCLUDE_DIR

_FIELDS = ("code", "op", "rank", "peer", "phase", "block", "expected", "observed")


class PeerTimeoutError(RuntimeError):
    """A kernel waited for a peer rank longer than its timeout and gave up.

    Attributes name the op, this rank, the peer it waited for, the phase of the collective, and
    the time waited. State shared with peers (signal counters) is no longer consistent after
    this: dispose of the communicator handle and create a new one.
    """

    def __init__(self, message: str, *, op: str, rank: int, peer: int, phase: str, waited_s: float):
        super().__init__(message)
        self.op, self.rank, self.peer, self.phase, self.waited_s = op, rank, peer, phase, waited_s


@functools.cache
def _enum(prefix: str) -> dict[int, str]:
    text = (INCLUDE_DIR / "fusedcomm" / "common" / "status.cuh").read_text()
    names = {}
    for name, value in re.findall(rf"\bk{prefix}(\w+)\s*=\s*(\d+)", text):
        names[int(value)] = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    return names


def op_name(op_id: int) -> str:
    return _enum("Op").get(op_id, f"op {op_id}")


def phase_name(phase_id: int) -> str:
    return _enum("Phase").get(phase_id, f"phase {phase_id}")


class FailureState:
    """The claim word and the failure record of one device."""

    def __init__(self, device: int):
        from ..jit import load_module

        self.device = device
        self._module = load_module("runtime")
        size = int(self._module.failure_record_size())
        if size != 64:
            raise RuntimeError(f"fusedcomm: the failure record is {size} bytes; this module reads 64")
        claim, host, mapped = (int(v) for v in self._module.failure_state_create(device))
        self.claim_ptr, self.record_host_ptr, self.record_device_ptr = claim, host, mapped
        self._code = ctypes.c_int32.from_address(host)
        # Counts the failures raised on this device. A communicator remembers the count at its
        # creation; once it differs, its shared counters may be out of step with its peers'.
        self.failures = 0

    def failed(self) -> bool:
        return self._code.value != 0

    def check(self) -> None:
        """Raise PeerTimeoutError if a kernel on this device gave up; then clear the record."""
        if self._code.value == 0:
            return
        words = (ctypes.c_int32 * 8).from_address(self.record_host_ptr)
        fields = dict(zip(_FIELDS, list(words)))
        fields["expected"] &= 0xFFFFFFFF
        fields["observed"] &= 0xFFFFFFFF
        waited_ns, timeout_ns = (ctypes.c_uint64 * 2).from_address(self.record_host_ptr + 32)
        world = ctypes.c_int32.from_address(self.record_host_ptr + 48).value
        op, phase = op_name(fields["op"]), phase_name(fields["phase"])
        message = (
            f"{op}: rank {fields['peer']} did not arrive within {timeout_ns / 1e9:g} s "
            f"(this rank {fields['rank']} of {world}, phase {phase}, block {fields['block']}, "
            f"waited {waited_ns / 1e9:.3f} s, flag expected {fields['expected']}, "
            f"observed {fields['observed']}). Communicators of this device created before "
            f"this error are no longer usable: dispose them and create new ones over fresh "
            f"(zeroed) signal buffers on every rank."
        )
        self._module.failure_state_reset(self.device, self.claim_ptr, self.record_host_ptr)
        self.failures += 1
        raise PeerTimeoutError(
            message, op=op, rank=fields["rank"], peer=fields["peer"], phase=phase,
            waited_s=waited_ns / 1e9,
        )


_lock = threading.Lock()
_states: dict[int, FailureState] = {}


def failure_state(device: int) -> FailureState:
    state = _states.get(device)
    if state is None:
        with _lock:
            state = _states.get(device)
            if state is None:
                state = _states[device] = FailureState(device)
    return state


def check_device(device: int) -> None:
    state = _states.get(device)
    if state is not None:
        state.check()


def check_errors(synchronize: bool = True) -> None:
    """Raise the first recorded peer failure on any device (after a device sync by default).

    Eager calls check before every launch, but replays of a CUDA graph run no Python: serving
    loops that replay graphs should call this now and then (e.g. once per step, after the
    step's own synchronisation) so that a lost peer surfaces as PeerTimeoutError.
    """
    import torch

    for device, state in list(_states.items()):
        if synchronize:
            torch.cuda.synchronize(device)
        state.check()
