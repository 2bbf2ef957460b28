import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. Set before any test module imports
# triton (triton.jit reads it when a kernel is defined); on CUDA the real kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_file():
    """shared_file(name): a file of ../shared/data, or a clean skip saying why."""

    def find(name: str) -> Path:
        path = SHARED_DATA / name
        if not path.is_file():
            pytest.skip(f"{path} is absent (the shared sample data is not beside this checkout)")
        return path

    return find


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run, but printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed
