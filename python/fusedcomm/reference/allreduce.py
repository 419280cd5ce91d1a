"""Reference all-reduce: what every rank's output must hold, computed with plain torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["all_reduce"]

# Input dtypes the reference accepts, and accumulation dtypes that can hold their sum.
_FLOAT_INPUTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACCUMULATORS = (torch.float32, torch.float64)


def all_reduce(
    inputs: Sequence[torch.Tensor], *, accumulate: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sum of every rank's tensor, accumulated in ascending rank order and rounded once.

    Equivalent to::

        acc = inputs[0].to(accumulate)            # first value upcast
        for r in range(1, len(inputs)):
            acc += inputs[r].to(accumulate)       # rank 1, 2, ... in that order
        return acc.to(inputs[0].dtype)            # one rounding to the input dtype

    Args:
        inputs: one tensor per rank, ``inputs[r]`` being rank ``r``'s input. All share one
            shape (any, including 0-d and empty), one dtype (float16, bfloat16, float32 or
            float64) and one device (CPU works). Strides and storage offsets are free.
        accumulate: keyword only; the dtype of the running sum, ``torch.float32`` (default,
            what fusedcomm's all-reduce kernels use) or ``torch.float64`` (required for
            float64 inputs: the accumulator is never narrower than the inputs).

    Returns:
        A new contiguous tensor with the inputs' shape, dtype and device. Inputs are not
        modified. Every element is rounded (round-to-nearest-even) exactly once, from the
        ``accumulate`` sum to the input dtype; with float32 inputs and float32 accumulation
        there is no final rounding beyond the additions themselves.

    The order is part of the contract: floating-point addition is not associative, so
    ``(a + b) + c`` and ``a + (b + c)`` may round differently. A kernel that reduces in this
    order (in fp32, rounding once) matches this reference bit for bit on every rank.

    Raises:
        ValueError: ``inputs`` is empty, or the tensors differ in shape or device.
        TypeError: an input is not a tensor, the dtypes differ or are not floating point, or
            ``accumulate`` is not float32/float64 or is narrower than the inputs.
    """
    if isinstance(inputs, torch.Tensor):
        raise TypeError(
            "all_reduce: inputs must be a sequence of tensors (one per rank), got one Tensor"
        )
    tensors = list(inputs)
    if not tensors:
        raise ValueError("all_reduce: inputs must hold one tensor per rank, got 0")
    for r, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"all_reduce: inputs[{r}] must be a Tensor, got {type(t).__name__}")
    first = tensors[0]
    if first.dtype not in _FLOAT_INPUTS:
        raise TypeError(
            f"all_reduce: dtype {first.dtype} is not supported "
            f"(float16, bfloat16, float32 or float64)"
        )
    if accumulate not in _ACCUMULATORS:
        raise TypeError(f"all_reduce: accumulate ({accumulate}) must be torch.float32 or float64")
    if first.dtype.itemsize > accumulate.itemsize:
        raise TypeError(
            f"all_reduce: accumulate ({accumulate}) is narrower than the inputs ({first.dtype})"
        )
    for r, t in enumerate(tensors[1:], start=1):
        if t.dtype != first.dtype:
            raise TypeError(f"all_reduce: inputs[{r}].dtype ({t.dtype}) differs from {first.dtype}")
        if t.shape != first.shape:
            raise ValueError(
                f"all_reduce: inputs[{r}].shape ({tuple(t.shape)}) differs from "
                f"{tuple(first.shape)}"
            )
        if t.device != first.device:
            raise ValueError(
                f"all_reduce: inputs[{r}] is on {t.device}, inputs[0] on {first.device}"
            )
    # copy=True: the running sum never aliases an input, even when no upcast is needed.
    acc = first.to(accumulate, copy=True).contiguous()
    for t in tensors[1:]:
        acc += t.to(accumulate)
    return acc.to(first.dtype)
