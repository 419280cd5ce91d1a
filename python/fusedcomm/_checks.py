"""Argument checks shared by every op family, and the one table of element sizes.

Each check names the op and the argument, states the constraint and shows the value it got
("allreduce_fusion: token_num (-1) must be >= 0"). Bad types raise TypeError, bad values
ValueError; a family whose errors are subclasses of both passes its own classes.
"""

from __future__ import annotations

import numbers
import operator
import os
from typing import Any

import torch

__all__ = [
    "ELEMENT_SIZE",
    "CudaUnavailableError",
    "bool_arg",
    "contiguous_on",
    "element_size",
    "int_arg",
    "real_arg",
    "require_cuda",
    "tensor_arg",
]

# Bytes per element of the activation dtypes the all-reduce kernels move.
ELEMENT_SIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


def int_arg(
    op: str,
    name: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    *,
    index: bool = False,
    hint: str = "",
    errors: tuple[type[Exception], type[Exception]] = (TypeError, ValueError),
) -> int:
    """``value`` if it is an int (not a bool) in [``minimum``, ``maximum``] (either bound may
    be None). ``index``: also take what ``operator.index`` turns into an int (numpy integers),
    returned as an int. A ``torch.SymInt`` (a size torch.compile traces) is taken as it is.
    ``hint`` is appended to the ValueError; ``errors`` are the (type, value) error classes."""
    type_error, value_error = errors
    if type(value) is not int and not isinstance(value, torch.SymInt):
        if isinstance(value, bool) or not (isinstance(value, int) or index):
            raise type_error(f"{op}: {name} must be an int, got {type(value).__name__} ({value!r})")
        try:
            value = operator.index(value)
        except TypeError:
            raise type_error(
                f"{op}: {name} must be an int, got {type(value).__name__} ({value!r})"
            ) from None
    low = minimum is not None and value < minimum
    if low or (maximum is not None and value > maximum):
        if maximum is None:
            bound = f">= {minimum}"
        elif minimum is None:
            bound = f"<= {maximum}"
        else:
            bound = f"in [{minimum}, {maximum}]"
        raise value_error(f"{op}: {name} ({value}) must be {bound}{hint}")
    return value


def bool_arg(op: str, name: str, value: Any) -> bool:
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def real_arg(op: str, name: str, value: Any) -> float:
    """``value`` as a float if it is a real number (not a bool)."""
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__} ({value!r})")
    return float(value)


def tensor_arg(op: str, name: str, t: Any) -> torch.Tensor:
    """``t`` if it is a tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    return t


def contiguous_on(op: str, name: str, t: Any, device: torch.device) -> torch.Tensor:
    """``t`` if it is a contiguous tensor on ``device`` (the device of the call's input)."""
    tensor_arg(op, name, t)
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, the input on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")
    return t


def element_size(op: str, dtype: Any) -> int:
    """Bytes per element of ``dtype``, one of the activation dtypes (float16, bfloat16,
    float32); TypeError for anything else."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"{op}: dtype must be a torch.dtype, got {type(dtype).__name__} ({dtype!r})"
        )
    size = ELEMENT_SIZE.get(dtype)
    if size is None:
        raise TypeError(
            f"{op}: dtype ({dtype}) is not supported: it must be float16, bfloat16 or float32"
        )
    return size


class CudaUnavailableError(RuntimeError):
    """An operation needs a CUDA device, and this torch cannot give it one."""


def require_cuda(op: str) -> None:
    """Raise CudaUnavailableError, naming ``op``, unless torch can use a CUDA device."""
    if torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        reason = (
            f"torch {torch.__version__} is a CPU-only build; install a CUDA build of "
            "torch (see https://pytorch.org/get-started/locally/)"
        )
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        reason = f"torch {torch.__version__} sees no CUDA device{where}"
    raise CudaUnavailableError(f"{op}: needs a CUDA GPU, but {reason}")
