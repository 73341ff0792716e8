"""Build hook for the optional C kernels (metadata lives in setup.cfg).

``torch_modularity/_kernels.c`` is plain C loaded with ctypes (no Python or numpy headers;
see ``torch_modularity/_native.py``). It is optional: without a C compiler the build skips it
and the library uses the numpy implementations of the same algorithms.
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
