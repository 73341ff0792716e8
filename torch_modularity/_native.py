"""Loader of the compiled kernels (``_kernels.c`` and ``_chain_step.c``, built by ``pip install``;
see ``setup.py``).

The kernels are optional: a package installed without a C compiler has no ``_kernels`` library
and every caller runs its numpy (or torch) implementation of the same algorithm instead.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path
import sys
from typing import Optional, Tuple

import torch

_I64, _PTR, _F64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
_SIGNATURES = {
    # refine.refine_partition on dense float32 / float64 blocks
    "tm_refine_dense_f32": [_I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64,
                            _F64, _PTR],
    "tm_refine_dense_f64": [_I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64,
                            _F64, _PTR],
    # spectral.kmeans
    "tm_kmeans": [_I64, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _F64, _I64, _PTR, _PTR, _PTR],
    # regularizer._ChainGram.step (float32 / float64): four BLAS/LAPACK function pointers, then the step's arrays
    "tm_chain_step_f32": [_PTR] * 4 + [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _F64,
                                       _I64, _F64, _F64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "tm_chain_step_f64": [_PTR] * 4 + [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _F64,
                                       _I64, _F64, _F64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
}


@functools.lru_cache(maxsize=1)
def kernels() -> Optional[ctypes.CDLL]:
    """The compiled library with its functions' signatures set, or ``None`` if not built.

    Memoized: looked up once per process.
    """
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_kernels{suffix}"
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))
            for name, argtypes in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype = ctypes.c_int
                fn.argtypes = argtypes
        except (OSError, AttributeError):
            return None  # unloadable, or built from another version of _kernels.c
        return lib
    return None


def available() -> bool:
    """Whether the compiled kernels are installed (else the numpy versions run)."""
    return kernels() is not None


@functools.lru_cache(maxsize=2)
def blas_lapack(prefix: str) -> Optional[Tuple[int, int, int, int]]:
    """Addresses of ``{prefix}gemm_``, ``{prefix}syevd_``, ``{prefix}geqrf_``, ``{prefix}orgqr_``
    (``prefix`` ``"s"`` or ``"d"``), or ``None``.

    The routines torch itself runs on the CPU (MKL in the x86-64 Linux wheels, which export the
    Fortran BLAS/LAPACK symbols from ``libtorch_cpu``), so a compiled step does the same
    arithmetic as the torch ops it replaces. Builds that do not export them (e.g. macOS with
    Accelerate) get ``None`` and the torch version runs. Memoized.
    """
    lib_dir = Path(torch.__file__).resolve().parent / "lib"
    names = ["libtorch_cpu.so", "libtorch_cpu.dylib"] if sys.platform != "win32" else []
    for name in names:
        path = lib_dir / name
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))  # already loaded by torch: the same handle
            return tuple(ctypes.cast(getattr(lib, f"{prefix}{routine}_"), ctypes.c_void_p).value
                         for routine in ("gemm", "syevd", "geqrf", "orgqr"))
        except (OSError, AttributeError):
            return None
    return None
