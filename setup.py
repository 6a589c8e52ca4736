"""Builds the one C extension: the fused pointwise half of a cell step (see its header)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cellserve.kernels._pointwise",
            sources=["cellserve/kernels/_pointwise.c"],
            extra_compile_args=["-O3", "-fno-math-errno", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
)
