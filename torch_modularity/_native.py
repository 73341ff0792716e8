"""Loader of the compiled kernels (``_kernels.c``, built by ``pip install``; see ``setup.py``).

The kernels are optional: a package installed without a C compiler has no ``_kernels`` library
and every caller runs its numpy implementation of the same algorithm instead.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path
from typing import Optional

_I64, _PTR, _F64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
_SIGNATURES = {
    # refine.refine_partition on dense float32 / float64 blocks
    "tm_refine_dense_f32": [_I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64,
                            _F64, _PTR],
    "tm_refine_dense_f64": [_I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64,
                            _F64, _PTR],
    # spectral.kmeans
    "tm_kmeans": [_I64, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _F64, _I64, _PTR, _PTR, _PTR],
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
