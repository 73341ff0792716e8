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
    # regularizer._ChainGram.step (float32 / float64): four BLAS/LAPACK function pointers, MKL's
    # mkl_set_num_threads_local (or NULL), the OpenMP team (openmp_team(), or NULL), then the step's arrays
    "tm_chain_step_f32": [_PTR] * 6 + [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _F64,
                                       _I64, _F64, _F64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "tm_chain_step_f64": [_PTR] * 6 + [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _F64,
                                       _I64, _F64, _F64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    # SpectralRegularizer._prepare and _HFTrace.backward on chains (float32 / float64); the three chain
    # kernels end with a Workspace's address (or NULL)
    "tm_chain_prepare_f32": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "tm_chain_prepare_f64": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "tm_chain_grad_f32": [_PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR],
    "tm_chain_grad_f64": [_PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR],
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


def _torch_cpu_library() -> Optional[ctypes.CDLL]:
    lib_dir = Path(torch.__file__).resolve().parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = lib_dir / name
        if path.is_file():
            try:
                return ctypes.CDLL(str(path))  # already loaded by torch: the same handle
            except OSError:
                return None
    return None


@functools.lru_cache(maxsize=1)
def mkl_set_num_threads_local() -> Optional[int]:
    """Address of MKL's C-interface ``MKL_Set_Num_Threads_Local(int)`` in ``libtorch_cpu`` (the lower-case
    symbol is the Fortran one, taking a pointer), or ``None``. Memoized."""
    lib = _torch_cpu_library()
    try:
        return ctypes.cast(lib.MKL_Set_Num_Threads_Local, ctypes.c_void_p).value if lib is not None else None
    except AttributeError:
        return None


@functools.lru_cache(maxsize=2)
def blas_lapack(prefix: str) -> Optional[Tuple[int, int, int, int]]:
    """Addresses of ``{prefix}gemm_``, ``{prefix}syevd_``, ``{prefix}geqrf_``, ``{prefix}orgqr_``
    (``prefix`` ``"s"`` or ``"d"``), or ``None``.

    The routines torch itself runs on the CPU (MKL in the x86-64 Linux wheels, which export the
    Fortran BLAS/LAPACK symbols from ``libtorch_cpu``), so a compiled step does the same
    arithmetic as the torch ops it replaces. Builds that do not export them (e.g. macOS with
    Accelerate) get ``None`` and the torch version runs. The kernels pass 32-bit integers, as
    torch's own calls of these symbols do (the LP64 interface). Memoized.
    """
    lib = _torch_cpu_library()
    if lib is None:
        return None
    try:
        return tuple(ctypes.cast(getattr(lib, f"{prefix}{routine}_"), ctypes.c_void_p).value
                     for routine in ("gemm", "syevd", "geqrf", "orgqr"))
    except AttributeError:
        return None


def chain_routines(dtype: torch.dtype) -> Optional[Tuple[int, int, int, int]]:
    """The BLAS/LAPACK addresses (:func:`blas_lapack`) the compiled chain kernels of the regularizer
    use for ``dtype``, or ``None`` where those kernels cannot run (not built, symbols not exported,
    a dtype other than float32/float64)."""
    if dtype not in (torch.float32, torch.float64) or kernels() is None:
        return None
    return blas_lapack("s" if dtype == torch.float32 else "d")


@functools.lru_cache(maxsize=1)
def _openmp_routines() -> Optional[Tuple[int, int, int]]:
    lib = _torch_cpu_library()
    # Only where torch's own ops run on that team: a build whose ATen pool is not OpenMP would get
    # a second set of threads next to its own.
    if lib is None or not torch._C.has_openmp or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        return tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                     for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads"))
    except AttributeError:
        return None


@functools.lru_cache(maxsize=None)  # never evicted: callers pass its address, not the tensor
def openmp_team(threads: int) -> Optional[torch.Tensor]:
    """The kernels' description of a team of ``threads`` of torch's own OpenMP threads, or ``None``
    (one thread, or no GNU OpenMP in this torch build): an int64 tensor of the addresses of
    ``GOMP_parallel``, ``omp_get_thread_num``, ``omp_get_num_threads`` (from the libgomp torch
    loaded, so the kernels run on the very threads torch's own ops use) and
    ``MKL_Set_Num_Threads_Local`` (0 if absent), and ``threads``. Memoized for the process, one
    per thread count (pass its ``data_ptr()``: the tensor is never freed)."""
    routines = _openmp_routines()
    if threads <= 1 or routines is None:
        return None
    return torch.tensor([*routines, mkl_set_num_threads_local() or 0, threads], dtype=torch.int64)


class Workspace:
    """Scratch memory the compiled chain kernels reuse from call to call for their work arrays.

    A kernel given :attr:`address` carves its arrays from :attr:`buffer` when it is large enough,
    else allocates them itself, and records how many bytes it needed; :meth:`fit` then grows the
    buffer to that, so later calls allocate nothing. Freeing and re-allocating ~0.7 MB of work
    arrays every step (paper MLP) churned the heap: glibc returned the pages to the system and
    the next step page-faulted them back in. One workspace serves kernels that never run at the
    same time (one thread); a copy starts empty.
    """

    __slots__ = ("spec", "buffer")

    def __init__(self) -> None:
        self.spec = (ctypes.c_int64 * 3)()  # address, capacity in bytes, bytes needed (set by the kernels)
        self.buffer: Optional[torch.Tensor] = None

    @property
    def address(self) -> int:
        """The address to pass to a kernel (the buffer's, refreshed: never a stale pointer)."""
        buf = self.buffer
        self.spec[0] = buf.data_ptr() if buf is not None else 0
        self.spec[1] = buf.numel() if buf is not None else 0
        return ctypes.addressof(self.spec)

    def fit(self) -> None:
        """Grow the buffer to what the kernels called since reported they need."""
        need = self.spec[2]
        if need > (self.buffer.numel() if self.buffer is not None else 0):
            self.buffer = torch.empty(need, dtype=torch.uint8)

    def __deepcopy__(self, memo) -> "Workspace":
        return Workspace()

    def __reduce__(self):
        return Workspace, ()
