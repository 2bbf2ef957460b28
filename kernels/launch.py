"""One kernel launch as a value: what a launcher runs and what kernels/compile.py builds.

Each launcher computes its launches (kernel, grid, arguments, constexprs, num_warps,
num_stages) in one function that touches no data, so the same function can run on "meta"
tensors to list, ahead of time, exactly the builds the launcher picks.
"""
from typing import Any, NamedTuple

# CUDA's grid limits: x up to 2^31 - 1 programs, y and z up to 65,535.
MAX_GRID = (2**31 - 1, 65535, 65535)


class Launch(NamedTuple):
    kernel: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: tuple  # the runtime arguments in the kernel's order: tensors, ints, floats
    constexprs: dict
    num_warps: int
    num_stages: int

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def checked_grid(*dims: int) -> tuple[int, ...]:
    """The grid, or a ValueError naming CUDA's limit it would pass (the input is too large)."""
    for axis, (n, limit) in enumerate(zip(dims, MAX_GRID)):
        if not 1 <= n <= limit:
            raise ValueError(f"launch grid {dims} needs {n} programs along axis {'xyz'[axis]}, "
                             f"outside CUDA's limit of 1..{limit}: the input is too large")
    return dims
