"""One kernel launch as a value: what a launcher runs and what kernels/compile.py builds.

Each launcher computes its launches (kernel, grid, arguments, constexprs, num_warps,
num_stages, optionally maxnreg) in one function that touches no data, so the same function can run on "meta"
tensors to list, ahead of time, exactly the builds the launcher picks, and on fake tensors as the
fake implementation of the kernel's custom op (kernel_op, below).
"""
from typing import Any, NamedTuple

import torch

# CUDA's grid limits: x up to 2^31 - 1 programs, y and z up to 65,535.
MAX_GRID = (2**31 - 1, 65535, 65535)


class Launch(NamedTuple):
    kernel: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: tuple  # the runtime arguments in the kernel's order: tensors, ints, floats
    constexprs: dict
    num_warps: int
    num_stages: int
    # ptxas's register budget per thread (Triton's maxnreg option); None leaves it to ptxas, which
    # may then aim at a low count and spill (kernels/sampling.py says when)
    maxnreg: int | None = None

    def options(self) -> dict:
        """The compile options of this launch, as triton.compile and a kernel launch take them."""
        extra = {} if self.maxnreg is None else {"maxnreg": self.maxnreg}
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **extra}

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options())


def checked_grid(*dims: int) -> tuple[int, ...]:
    """The grid, or a ValueError naming CUDA's limit it would pass (the input is too large)."""
    for axis, (n, limit) in enumerate(zip(dims, MAX_GRID)):
        if not 1 <= n <= limit:
            raise ValueError(f"launch grid {dims} needs {n} programs along axis {'xyz'[axis]}, "
                             f"outside CUDA's limit of 1..{limit}: the input is too large")
    return dims


# Every public kernel is registered as a custom op in this namespace: torch.ops.llm_engine.<name>.
NAMESPACE = "llm_engine"


def _launch_all(launches):
    for launch in launches:
        launch()


def _launch_none(launches):
    pass


def kernel_op(name: str, schema: str, backward=None, setup_context=None, mutates_args=()):
    """Decorator: register body(*args, run) as the custom op llm_engine::<name> (torch.library), so
    that torch.compile traces it without a graph break and a CUDA graph can capture it.

    body gets the op's arguments (schema: torch.library's, e.g. "(Tensor x, float eps) -> Tensor")
    and run, to which it hands the launches its launcher computed. Its fake implementation, what
    torch.compile traces with, is body with a run that launches nothing: launchers read no data, so
    on fake tensors body still returns outputs with the real ones' shapes, strides and dtypes.
    backward, setup_context: torch.library.register_autograd's. mutates_args: the names of the
    arguments the kernels write in place (the schema marks them Tensor(a!)).

    torch.library.custom_op rather than triton_op + wrap_triton: under TRITON_INTERPRET=1 (the
    CPU, where the tests run) wrap_triton hands back the interpreted kernel, and triton_op then runs
    it on fake tensors when tracing, which fails (opcheck and torch.compile, even with a
    registered fake); one registration on both devices keeps the CPU tests testing what runs.
    """
    def register(body):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", lambda *args: body(*args, run=_launch_all),
                                     mutates_args=mutates_args, schema=schema)
        op.register_fake(lambda *args: body(*args, run=_launch_none))
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        return op

    return register
