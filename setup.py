"""Build hook for the optional C kernels (metadata lives in setup.cfg).

``torch_modularity/_kernels.c`` (k-means, refinement) and ``_chain_step.c`` (the regularizer's
per-step solver, |W|/degree pass and backward, calling the BLAS/LAPACK routines torch exports)
are plain C loaded with ctypes (no Python or numpy headers; see ``torch_modularity/_native.py``).
They are optional: without a C compiler the build skips them and the library uses the numpy /
torch implementations of the same algorithms.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "torch_modularity._kernels",
            sources=["torch_modularity/_kernels.c", "torch_modularity/_chain_step.c"],
            depends=["torch_modularity/_chain_step.h"],
            # No contraction into fused multiply-adds: the kernels reproduce the numpy
            # versions' arithmetic operation by operation.
            extra_compile_args=["-O3", "-ffp-contract=off"],
            optional=True,
        )
    ],
)
