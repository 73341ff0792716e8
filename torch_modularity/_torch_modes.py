"""How the library behaves inside torch's execution modes: autocast and ``torch.compile``.

Mixed precision (``torch.autocast``) would run the solvers' and the regularizer's products in
half precision; ``torch.compile`` would trace into code that is compiled C, host decisions and
numpy. Both are switched off for that code, at the cost of one cheap check per call otherwise.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, TypeVar

import torch

_F = TypeVar("_F", bound=Callable)


def autocast_active() -> bool:
    """Whether autocast is on for any device (a cheap check: one C call on torch >= 2.4)."""
    check = getattr(torch._C, "_is_any_autocast_enabled", None)
    return True if check is None else bool(check())


def autocast_off() -> contextlib.AbstractContextManager:
    """A context with autocast switched off on the CPU and on torch's accelerator (if any).

    Inside a mixed-precision region (``torch.autocast``) the solvers' products would otherwise
    run in half precision: eigenvectors accurate to ~1e-2 instead of the tolerance, or dtypes
    that no longer match. The solvers and the regularizer always compute in their tensors' own
    dtype; outside autocast this costs one check per call.
    """
    if not autocast_active():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    device = accelerator.current_accelerator() if accelerator is not None else None
    if device is not None and device.type != "cpu":
        stack.enter_context(torch.autocast(device.type, enabled=False))
    elif accelerator is None and torch.cuda.is_available():  # older torch: its one autocast accelerator
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


def full_precision(fn: _F) -> _F:
    """``fn`` runs with autocast off (see :func:`autocast_off`); outside autocast, one check (it
    wraps the regularizer's training-step calls)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not autocast_active():
            return fn(*args, **kwargs)
        with autocast_off():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def eager_under_compile(fn: _F) -> _F:
    """``fn``, run eagerly when code that ``torch.compile`` traces calls it: one graph break, its
    body not traced (tracing into the regularizer took minutes, into the monitor it aborted).

    ``torch.compiler.disable`` imports dynamo (~2 s, which ``import torch_modularity`` would pay
    in every process); the disabled copy is therefore made on the first call that dynamo traces,
    and plain calls cost one flag check.
    """
    disabled = []
    is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch >= 2.3

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if is_compiling():
            if not disabled:
                disabled.append(torch.compiler.disable(fn))
            return disabled[0](*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
