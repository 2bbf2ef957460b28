import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. Set before any test module imports
# triton (triton.jit reads it when a kernel is defined); on CUDA the real kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker would run torch on every core: 2 workers x 2 threads on 2 cores
# leave each op's threads waiting for one another (a float64 decode test took 28 s that way and 1.2 s
# with one thread each). Each worker gets its share of the cores, and so do the processes it starts.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# pretrain and finetune cache the token shards of the files they read: the tests' go to a temporary folder
os.environ.setdefault("LLM_ENGINE_CACHE", tempfile.mkdtemp(prefix="llm-engine-cache-"))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SEED_ENV = "LLM_ENGINE_TEST_SEED"  # set it to replay a failed test with the seed its report printed


# `make test` runs with `--dist loadgroup` on every core: each file stays on one worker (its module
# fixtures, such as the AOT compile table, run once), except the long kernel-parity files named here,
# which have per-test fixtures only and spread over the workers so that none runs alone at the end.
SPREAD_OVER_WORKERS = {"test_attention.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name not in SPREAD_OVER_WORKERS:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


@pytest.fixture
def shared_file():
    """shared_file(name): a file of ../shared/data, or a clean skip saying why."""

    def find(name: str) -> Path:
        path = SHARED_DATA / name
        if not path.is_file():
            pytest.skip(f"{path} is absent (the shared sample data is not beside this checkout)")
        return path

    return find


@pytest.fixture
def nan_poisoned_outputs(monkeypatch):
    """Every torch.empty / empty_like hands out NaN-filled memory, so an output element a kernel
    forgets to write fails the comparison. The kernel test modules use it on every test (pytestmark)."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run (torch, random, numpy), from a seed that a failing test's
    report prints; LLM_ENGINE_TEST_SEED=<seed> replays it."""
    seed = int(os.environ.get(SEED_ENV) or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    request.node.test_seed = seed
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seed = getattr(item, "test_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"replay with {SEED_ENV}={seed} pytest '{item.nodeid}'"))


@pytest.fixture
def torch_threads():
    """set(n): torch's intra-op threads for this test, restored after it."""
    default = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(default)
