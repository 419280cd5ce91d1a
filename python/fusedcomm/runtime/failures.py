"""Turn a kernel's failure record into a Python exception.

Every communicator owns a :class:`FailureState`: a claim word on the device and a record in
pinned host memory (include/fusedcomm/common/failure.cuh; docs/failure-protocol.md). A kernel
that gives up waiting for a peer fills the record, marks every peer (so they give up too instead
of computing on stale data) and returns, so the CUDA context stays usable. From then on the
communicator is refused on every rank: its kernels do nothing and every call raises.

- Frontends call :meth:`FailureState.check` before each launch; it reads the record without
  synchronising (a few hundred nanoseconds).
- :func:`check_errors` checks every live communicator; by default it first synchronises, so it
  also sees a failure of the last launch. ``check_errors(synchronize=False)`` is the cheap check
  for loops that replay CUDA graphs: call it after each replay and it raises within one replay
  of the failure being recorded.
The record layout and the code names come from the compiled runtime module, the op and phase
names from the family's own module: nothing is re-typed here.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import threading
import weakref


class CommFailureError(RuntimeError):
    """A communicator failed: a rank gave up waiting for a peer, on this rank or on a peer.

    Attributes name the op, this rank, the peer involved, the phase of the collective and the
    time waited. The communicator is unusable afterwards on every rank: dispose of it (or
    destroy the workspace) and create a new one over fresh buffers on every rank.
    """

    def __init__(self, message: str, *, op: str, rank: int, peer: int, phase: str, waited_s: float):
        super().__init__(message)
        self.op, self.rank, self.peer, self.phase, self.waited_s = op, rank, peer, phase, waited_s


class PeerTimeoutError(CommFailureError):
    """This rank waited for a peer longer than the timeout and gave up."""


class PeerAbortedError(CommFailureError):
    """A peer gave up first (it timed out or saw a failure) and told this rank."""


class ProtocolMismatchError(CommFailureError):
    """A peer reached the same step in another phase or algorithm: the ranks' calls differ."""


_ERRORS = {
    "timeout": PeerTimeoutError,
    "peer_aborted": PeerAbortedError,
    "mismatch": ProtocolMismatchError,
}


@dataclasses.dataclass(frozen=True)
class FamilyNames:
    """How one kernel family names its op and phases in messages (from its module)."""

    op: str
    phases: tuple[str, ...]

    def phase(self, index: int) -> str:
        return self.phases[index] if 0 <= index < len(self.phases) else f"phase {index}"


@functools.cache
def _runtime():
    from ..jit import load_module

    return load_module("runtime")


@functools.cache
def _layout() -> tuple[dict[str, tuple[int, int]], tuple[str, ...]]:
    fields = {
        str(name): (int(offset), int(size))
        for name, offset, size in _runtime().failure_record_fields()
    }
    codes = tuple(str(c) for c in _runtime().failure_code_names())
    return fields, codes


def _read(address: int, size: int) -> int:
    return (ctypes.c_uint64 if size == 8 else ctypes.c_uint32).from_address(address).value


_lock = threading.Lock()
_live: weakref.WeakSet = weakref.WeakSet()


class FailureState:
    """The claim word and failure record of one communicator on ``device``."""

    def __init__(self, device: int, names: FamilyNames):
        self.device, self.names = device, names
        fields, _ = _layout()
        claim, host, mapped = (int(v) for v in _runtime().failure_state_create(device))
        self.claim_ptr, self.record_host_ptr, self.record_device_ptr = claim, host, mapped
        offset, _ = fields["code"]
        self._code = ctypes.c_int32.from_address(host + offset)
        self._error: CommFailureError | None = None
        with _lock:
            _live.add(self)

    def failed(self) -> bool:
        """True once a kernel of this communicator has recorded a failure (no device sync)."""
        return self._code.value != 0

    def check(self, op: str | None = None) -> None:
        """Raise if this communicator failed: the recorded error first, then a refusal."""
        if self._code.value == 0:
            return
        if self._error is None:
            self._error = self._build_error()
            raise self._error
        cls = type(self._error)
        raise cls(
            f"{op or self.names.op}: this communicator failed earlier and is refused on "
            f"every rank ({self._error}).",
            op=self._error.op,
            rank=self._error.rank,
            peer=self._error.peer,
            phase=self._error.phase,
            waited_s=self._error.waited_s,
        )

    def _build_error(self) -> CommFailureError:
        fields, codes = _layout()
        r = {
            name: _read(self.record_host_ptr + off, size)
            for name, (off, size) in fields.items()
            if name != "size"
        }
        for name in ("code", "rank", "peer", "phase", "block", "world"):
            r[name] = ctypes.c_int32(r[name]).value
        code = codes[r["code"]] if 0 <= r["code"] < len(codes) else f"code {r['code']}"
        phase, op = self.names.phase(r["phase"]), self.names.op
        what = {
            "timeout": f"rank {r['peer']} did not arrive within {r['timeout_ns'] / 1e9:g} s",
            "peer_aborted": f"rank {r['peer']} gave up (it timed out or saw a failure) and told "
            "this rank",
            "mismatch": f"rank {r['peer']} is in another phase or algorithm of this step (the "
            "ranks' calls differ: same sizes, dtypes and algorithm on every rank?)",
        }.get(code, code)
        message = (
            f"{op}: {what} (this rank {r['rank']} of {r['world']}, phase {phase}, block "
            f"{r['block']}, waited {r['waited_ns'] / 1e9:.3f} s, flag expected "
            f"{r['expected']:#x}, observed {r['observed']:#x}). This communicator is now "
            f"refused on every rank: dispose of it and create a new one over fresh (zeroed) "
            f"buffers on every rank."
        )
        return _ERRORS.get(code, CommFailureError)(
            message,
            op=op,
            rank=r["rank"],
            peer=r["peer"],
            phase=phase,
            waited_s=r["waited_ns"] / 1e9,
        )

    def clear(self) -> None:
        """Forget a recorded failure: zero the record (the owner zeroes the claim word on the
        device). Only while no kernel of this communicator runs or is queued on any rank."""
        fields, _ = _layout()
        if self.record_host_ptr:
            ctypes.memset(self.record_host_ptr, 0, fields["size"][1])
        self._error = None

    def close(self) -> None:
        """Free the state (synchronises the device first). Call once, when disposing."""
        with _lock:
            _live.discard(self)
        if self.claim_ptr:
            _runtime().failure_state_destroy(self.device, self.claim_ptr, self.record_host_ptr)
            self.claim_ptr = self.record_host_ptr = self.record_device_ptr = 0
            self._code = ctypes.c_int32(0)


def check_errors(synchronize: bool = True) -> None:
    """Raise the recorded failure of any live communicator (after a device sync by default).

    Eager calls check before every launch, but replays of a CUDA graph run no Python: serving
    loops that replay graphs should call ``check_errors(synchronize=False)`` after each replay
    (it reads pinned host memory only) and ``check_errors()`` where they synchronise anyway.
    Synchronising is refused while the current stream captures a CUDA graph.
    """
    import torch

    with _lock:
        states = list(_live)
    if synchronize:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "check_errors: cannot synchronise while a CUDA graph is being captured; call "
                "check_errors(synchronize=False) inside the capture region, or check after it"
            )
        for device in sorted({s.device for s in states}):
            torch.cuda.synchronize(device)
    for state in states:
        state.check()
