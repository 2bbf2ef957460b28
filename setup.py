"""Builds the C++ extensions when their sources are present: the sampling loop (engine._sampler),
the CPU decode attention (engine._decode_attention) and the whole CPU decode step (engine._decode_step).

Everything else about the package lives in pyproject.toml.
"""
import ctypes.util
import platform
import sys
from pathlib import Path

from setuptools import setup

ext_modules = []
if Path("csrc").is_dir():  # a source tree (an installed wheel has the built modules instead)
    from pybind11.setup_helpers import Pybind11Extension

    # glibc's vector math library: gcc calls it for a vectorised exp under -ffast-math
    libmvec_x86 = sys.platform == "linux" and platform.machine() == "x86_64" and ctypes.util.find_library("mvec")
    fast_math, libmvec = (["-ffast-math"], ["-lmvec"]) if libmvec_x86 else ([], [])
    ext_modules = [
        Pybind11Extension(
            "engine._sampler",
            ["csrc/sampler.cpp"],
            depends=["csrc/parallel.h", "csrc/simd.h"],  # (rebuilt when they change, and shipped in an sdist)
            cxx_std=17,
            # no FMA contraction: the C++ and reference samplers must round identically; omp simd
            # pragmas for the loops whose order does not matter (the greedy row's maximum)
            extra_compile_args=["-O3", "-ffp-contract=off", "-fopenmp-simd"],
        ),
        # the decode attention and the whole decode step: vectorised reductions (omp simd); with
        # libmvec also a vectorised exp
        *(Pybind11Extension(
            f"engine._{name}",
            [f"csrc/{name}.cpp"],
            depends=["csrc/attention.h", "csrc/parallel.h", "csrc/simd.h", "csrc/tensor_view.h"],
            cxx_std=17,
            extra_compile_args=["-O3", "-fopenmp-simd", *fast_math],
            extra_link_args=libmvec,
        ) for name in ("decode_attention", "decode_step")),
    ]

setup(ext_modules=ext_modules)
