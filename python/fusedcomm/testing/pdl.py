"""A programmatic-dependent-launch probe for tests.

A kernel launched with programmatic dependent launch (PDL) may start before the kernel ahead of
it in the stream has finished; its ``griddepcontrol.wait`` must still make everything that
kernel wrote visible. :func:`probe` launches such a dependent right away: it waits, then counts
the elements of ``src`` whose bits differ from ``expect`` into a device counter. A producer
that hands over incomplete data (it lets dependents start and they read too early) shows up
as a non-zero count::

    counter = new_counter()
    allreduce_fusion(..., launch_with_pdl=True, trigger_completion_at_end=False)
    probe(norm_out, expected, counter)          # launched with the PDL attribute
    assert counter.item() == 0

Everything runs on the current CUDA stream and is CUDA-graph capturable (load the module once
with :func:`load_probe` before capturing).
"""

from __future__ import annotations

import functools

import torch

from ..jit import get_spec, load

__all__ = ["load_probe", "new_counter", "probe"]

_BYTE_VIEW = (torch.float8_e4m3fn, torch.float8_e5m2)


@functools.cache
def load_probe():
    """The compiled probe module (built on first use)."""
    return load(get_spec("pdl_probe"))


def new_counter(device: torch.device | int | None = None) -> torch.Tensor:
    """A zeroed int32 ``[1]`` mismatch counter on ``device`` (default: the current one)."""
    if device is None:
        device = torch.cuda.current_device()
    return torch.zeros(1, dtype=torch.int32, device=device)


def probe(
    src: torch.Tensor, expect: torch.Tensor, mismatches: torch.Tensor, *, pdl: bool = True
) -> None:
    """Add to ``mismatches[0]`` the number of elements of ``src`` that differ bitwise from
    ``expect``, in a kernel launched on the current stream with programmatic dependent launch
    (``pdl``) that waits for its dependency before it reads.

    ``src`` and ``expect``: contiguous CUDA tensors of one dtype with 1-, 2- or 4-byte elements
    (FP8 tensors are compared as bytes) and the same number of elements; ``mismatches``: an
    int32 CUDA tensor (see :func:`new_counter`). Nothing is synchronised.
    """
    if src.dtype != expect.dtype:
        raise TypeError(f"probe: expect.dtype ({expect.dtype}) must be src's ({src.dtype})")
    if src.dtype in _BYTE_VIEW:
        src, expect = src.view(torch.uint8), expect.view(torch.uint8)
    load_probe().pdl_probe_launch(src, expect, mismatches, bool(pdl))
