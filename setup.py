"""Builds the C++ sampling extension (engine._sampler) when its sources are present.

Everything else about the package lives in pyproject.toml.
"""
from pathlib import Path

from setuptools import setup

ext_modules = []
if Path("csrc/sampler.cpp").exists():
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules.append(
        Pybind11Extension(
            "engine._sampler",
            ["csrc/sampler.cpp"],
            cxx_std=17,
            # no FMA contraction: the C++ and reference samplers must round identically
            extra_compile_args=["-O3", "-ffp-contract=off", "-pthread"],
            extra_link_args=["-pthread"],
        )
    )

setup(ext_modules=ext_modules)
