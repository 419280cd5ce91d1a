"""Register fusedcomm ops with torch.library, so torch.compile traces them and graphs capture them.

Each op gets a schema (with aliasing annotations for what it writes), a real implementation and,
where it touches tensors, a fake implementation that torch.compile runs on meta tensors.
Frontends call the implementation directly in eager mode (the dispatcher costs several
microseconds per call, which matters for small collectives) and the registered op while
torch.compile traces, so both paths run the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NAMESPACE = "fusedcomm"
_lib = torch.library.Library(NAMESPACE, "DEF")


def register_op(schema: str, impl: Callable, fake: Callable | None = None):
    """Define ``fusedcomm::<schema>``, bind ``impl`` (and ``fake``); return the op overload packet.

    ``schema`` is the torch schema without namespace, e.g.
    ``"vllm_all_reduce(int fa, Tensor inp, Tensor(a!) out) -> ()"``.
    """
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    _lib.impl(name, impl, "CompositeExplicitAutograd")
    if fake is not None:
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_lib)
    return getattr(getattr(torch.ops, NAMESPACE), name)


def tracing() -> bool:
    """True while torch.compile traces (call the registered op), False in eager mode."""
    return torch.compiler.is_compiling()
