"""BLAS thread control without extra dependencies (ctypes on the loaded OpenBLAS libraries).

Matrix-vector products on weight blocks are memory-bound: a second BLAS thread gains little,
and when the other cores are busy (a training loop, shuffle workers) OpenBLAS threads that
spin-wait make a GEMV up to 100x slower. The clustering pipeline therefore runs with one
BLAS thread, and pool workers are limited to one thread each.
"""
from __future__ import annotations

import ctypes
import functools
import re
import sys
from contextlib import contextmanager
from typing import Iterator, List, Tuple

_SET = ("openblas_set_num_threads", "openblas_set_num_threads64_",
        "scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_")
_GET = ("openblas_get_num_threads", "openblas_get_num_threads64_",
        "scipy_openblas_get_num_threads", "scipy_openblas_get_num_threads64_")


@functools.lru_cache(maxsize=1)
def _openblas_controls() -> List[Tuple[object, object]]:
    """(getter, setter) pairs of every OpenBLAS loaded in this process (Linux only).

    Memoized: scanning ``/proc/self/maps`` costs milliseconds, and the OpenBLAS copies
    (numpy's, scipy's) are loaded when this package is imported; forked workers share them.
    """
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as fh:
            lines = [line for line in fh if "openblas" in line]
        paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", "".join(lines))))
    except OSError:
        return []
    controls = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        get = next((getattr(lib, n) for n in _GET if hasattr(lib, n)), None)
        put = next((getattr(lib, n) for n in _SET if hasattr(lib, n)), None)
        if get is not None and put is not None:
            get.restype = ctypes.c_int
            controls.append((get, put))
    return controls


def limit_threads(n: int = 1) -> None:
    """Set torch's and every loaded OpenBLAS's thread count to ``n`` (for worker processes)."""
    try:
        import torch

        torch.set_num_threads(n)
    except Exception:  # a worker must never fail here
        pass
    for _, put in _openblas_controls():
        put(ctypes.c_int(n))


@contextmanager
def blas_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` OpenBLAS threads, then restore the previous counts."""
    controls = _openblas_controls()
    before = [get() for get, _ in controls]
    for _, put in controls:
        put(ctypes.c_int(n))
    try:
        yield
    finally:
        for (_, put), count in zip(controls, before):
            put(ctypes.c_int(count))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count.

    Small torch operations (QR and Rayleigh-Ritz on a skinny block) gain nothing from a second
    thread and lose up to 30x when another process holds a core (OpenMP spin-waiting).
    """
    import torch

    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
