"""The random seed of a failing test is printed, and LLM_ENGINE_TEST_SEED replays it."""
import re
from pathlib import Path

pytest_plugins = ["pytester"]

FAILING_TEST = """
import torch

def test_draws_and_fails():
    print("drew", torch.rand(1).item())
    assert False
"""


def run(pytester, monkeypatch, seed=None):
    if seed is None:
        monkeypatch.delenv("LLM_ENGINE_TEST_SEED", raising=False)
    else:
        monkeypatch.setenv("LLM_ENGINE_TEST_SEED", str(seed))
    out = "\n".join(pytester.runpytest_inprocess("-p", "no:cacheprovider").outlines)
    return re.search(r"drew (\S+)", out).group(1), re.search(r"LLM_ENGINE_TEST_SEED=(\d+)", out)


def test_a_failing_test_prints_a_seed_that_replays_it(pytester, monkeypatch):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(FAILING_TEST)
    drawn, printed = run(pytester, monkeypatch)
    assert printed, "the failure report names no seed"
    replayed, again = run(pytester, monkeypatch, seed=printed.group(1))
    assert replayed == drawn and again.group(1) == printed.group(1)
    other, _ = run(pytester, monkeypatch, seed=int(printed.group(1)) + 1)
    assert other != drawn
