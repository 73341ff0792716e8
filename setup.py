"""Build hook for the optional C kernel (metadata lives in setup.cfg).

``torch_modularity/_refine_native.c`` is plain C loaded with ctypes (no Python or numpy
headers). It is optional: without a C compiler the build skips it and the library uses the
numpy implementation of the same algorithm (``torch_modularity.refine``).
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "torch_modularity._refine_native",
            sources=["torch_modularity/_refine_native.c"],
            # No contraction into fused multiply-adds: the kernel reproduces the numpy
            # version's arithmetic operation by operation.
            extra_compile_args=["-O3", "-ffp-contract=off"],
            optional=True,
        )
    ],
)
