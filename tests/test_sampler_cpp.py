"""The C++ sampler (engine._sampler) against the reference in engine/sampling.py, and the benchmark script's smoke test."""
import csv
import dataclasses
import functools
import gc
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import InputError
from engine.sampling import DecodeLoop, Finish, Sampler, SamplingParams

pytest.importorskip("engine._sampler", reason="the C++ extension engine._sampler is not built (pip install -e .)")

ROOT = Path(__file__).resolve().parents[1]


def random_params(rng: random.Random, V: int) -> SamplingParams:
    pick = rng.choice
    return SamplingParams(
        temperature=pick([0.0, 1e-30, 1e-3, 0.3, 0.7, 1.0, 1.0, 2.5, 1e6, 1e30]),
        top_k=pick([0, 0, 1, 2, 5, 50, V - 1, V, V + 7]) if V > 1 else pick([0, 1, 3]),
        top_p=pick([1.0, 1.0, rng.uniform(0.01, 0.999), rng.uniform(0.5, 0.95)]),
        min_p=pick([0.0, 0.0, rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.2)]),
        repetition_penalty=pick([1.0, rng.uniform(0.5, 2.0)]),
        presence_penalty=pick([0.0, rng.uniform(-2, 2)]),
        frequency_penalty=pick([0.0, rng.uniform(-2, 2)]),
        logit_bias=pick([None, None, {rng.randrange(V): rng.uniform(-5, 5) for _ in range(3)}] + [{rng.randrange(V): -math.inf}] * (V > 1)),
        seed=rng.randrange(2**64),
        logprobs=rng.random() < 0.5,
    )


def random_logits(rng: random.Random, B: int, V: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    kind = rng.choice(["normal", "ties", "wide", "tiny"])
    if kind == "ties":  # few distinct values: ties everywhere, also at the top
        x = torch.randint(-3, 3, (B, V), generator=g).float()
    elif kind == "wide":
        x = torch.randn(B, V, generator=g) * 30
    elif kind == "tiny":
        x = torch.randn(B, V, generator=g) * 1e-6
    else:
        x = torch.randn(B, V, generator=g) * 2
    mask = torch.rand(B, V, generator=g) < rng.choice([0.0, 0.1, 0.6])
    x[mask] = -math.inf
    for i in rng.sample(range(V), min(V, 2)):  # a banned token (random_params) leaves one finite logit
        x[:, i] = rng.uniform(-4, 4)
    return x


def test_cpp_and_reference_pick_identical_tokens_over_1000_random_cases():
    rng = random.Random(0)
    cpp, ref = Sampler("cpp"), Sampler("reference")
    rows = 0
    for case in range(1000):
        V = rng.choice([1, 2, 7, 64, 300, 1000]) if case % 50 else 32000
        B = rng.randint(1, 4)
        x = random_logits(rng, B, V)
        params = [random_params(rng, V) for _ in range(B)]
        prev = [[rng.randrange(V) for _ in range(rng.choice([0, 3, 40]))] for _ in range(B)]
        positions = [rng.randrange(10**6) for _ in range(B)]
        t1, lp1 = cpp.sample_with_logprobs(x, params, prev, positions)
        t2, lp2 = ref.sample_with_logprobs(x, params, prev, positions)
        assert t1.tolist() == t2.tolist(), (case, params)
        assert torch.allclose(lp1, lp2, rtol=1e-12, atol=1e-12, equal_nan=True), case
        rows += B
    assert rows > 2000


def test_decode_loops_agree_step_by_step():
    rng = random.Random(1)
    V, B, steps = 40, 6, 30
    token_bytes = [bytes([97 + i % 3]) * (1 + i % 2) for i in range(V)]  # "a", "bb", "c", "aa", ...: "ab" straddles tokens
    params = [random_params(rng, V) for _ in range(B)]
    params[0] = SamplingParams(temperature=0.9, stop=("ab", "cccc"), seed=3, max_new_tokens=50)
    params[1] = SamplingParams(top_k=5, stop_token_ids=(1, 2, 3), seed=4, logprobs=True, max_new_tokens=50)
    params[2] = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, seed=5, max_new_tokens=7)
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 9))] for _ in range(B)]
    params[3] = SamplingParams(top_p=0.8, logprobs=True)  # seed=None: the reference replays the recorded seed
    cpp = DecodeLoop(params, prompts, token_bytes, impl="cpp")
    replay = [dataclasses.replace(p, seed=s) for p, s in zip(params, cpp.seeds)]
    loops = [cpp, DecodeLoop(replay, prompts, token_bytes, impl="reference")]
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(B, V, generator=g).to(torch.float16)  # any dtype: copied once to float32
        assert loops[0].step(x).tolist() == loops[1].step(x).tolist()
    assert loops[0].generated == loops[1].generated
    assert loops[0].finish_reason == loops[1].finish_reason
    assert loops[0].finished == loops[1].finished
    for a, b in zip(*(loop.logprobs for loop in loops)):
        assert a == pytest.approx(b, abs=1e-12)
    assert len(loops[0].logprobs[1]) == len(loops[0].generated[1]) > 0
    assert loops[0].finish_reason[:3] == ["stop_string", "stop_token", "length"] and len(loops[0].generated[2]) == 7


def test_finish_codes_are_the_same_in_cpp_and_python():
    from engine import _sampler

    assert {name: int(code) for name, code in _sampler.Finish.__members__.items()} == {f.name: int(f) for f in Finish}


def test_cpp_bad_arguments_raise_input_error_and_bad_logits_value_error():
    loop = DecodeLoop([SamplingParams(seed=0)], [[1]], impl="cpp")
    loop.step(torch.randn(1, 10))
    with pytest.raises(InputError, match="V=10 to V=11"):
        loop.stepper(np.zeros((1, 11), np.float32))(np.zeros((1, 11), np.float32))  # the C++ check, no Python one before it
    x = torch.randn(1, 10)
    x[0, 3] = math.nan
    with pytest.raises(ValueError, match="NaN") as err:
        loop.step(x)
    assert not isinstance(err.value, InputError)


def test_cpp_raises_on_nan_and_all_masked_rows():
    cpp = Sampler("cpp")
    x = torch.randn(4, 100)
    params = [SamplingParams(seed=b) for b in range(4)]
    bad = x.clone()
    bad[3, 50] = math.nan
    with pytest.raises(ValueError, match="row 3.*NaN"):
        cpp.sample(bad, params, [[]] * 4, [0] * 4)
    bad = x.clone()
    bad[2] = -math.inf
    with pytest.raises(ValueError, match="row 2.*-inf"):
        cpp.sample(bad, params, [[]] * 4, [0] * 4)
    loop = DecodeLoop(params, [[1]] * 4, impl="cpp")
    with pytest.raises(ValueError, match="row 2"):
        loop.step(bad)
    assert loop.generated == [[]] * 4
    banned = [SamplingParams(temperature=0, logit_bias=dict.fromkeys(range(100), -math.inf))]
    with pytest.raises(ValueError, match="row 0.*-inf"):
        cpp.sample(x[:1], banned, [[]], [0])


def test_a_seeded_request_is_batch_invariant_in_the_cpp_sampler():
    rng = random.Random(2)
    V, steps = 500, 10
    target = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=1234, logprobs=True)
    others = [random_params(rng, V) for _ in range(31)]
    prompt = [3, 1, 4, 1, 5]
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(32, V, generator=g) for _ in range(steps)]

    def run(order):  # order: the batch as indices into [target] + others; 0 is the target
        batch = [([target] + others)[i] for i in order]
        row = order.index(0)
        loop = DecodeLoop(batch, [prompt] * len(batch), impl="cpp")
        for t in range(steps):
            x = logits[t][: len(batch)].clone()
            x[row] = logits[t][0]
            loop.step(x)
        return loop.generated[row], loop.logprobs[row]

    alone = run([0])
    for _ in range(3):
        order = list(range(32))
        rng.shuffle(order)
        assert run(order) == alone


def test_cpp_draws_follow_the_filtered_renormalised_softmax():
    from scipy.stats import chisquare

    V, n = 20, 20_000
    x = torch.randn(1, V, generator=torch.Generator().manual_seed(4)) * 1.5
    p = SamplingParams(temperature=0.8, top_k=12, top_p=0.9, min_p=0.05, seed=99)
    toks = Sampler("cpp").sample(x.expand(n, V), [p] * n, [[]] * n, list(range(n)))
    probs = torch.softmax(x[0].double() / 0.8, 0)  # the filter, from plain softmax arithmetic
    order = torch.sort(probs, descending=True, stable=True).indices[:12]
    kept = order[: int((torch.cumsum(probs[order], 0) < 0.9 * probs[order].sum()).sum()) + 1]
    kept = kept[probs[kept] >= 0.05 * probs[kept].max()]
    expected = probs[kept] / probs[kept].sum() * n
    observed = torch.bincount(toks, minlength=V).double()
    assert observed.sum() == observed[kept].sum()  # nothing outside the kept set
    assert len(kept) >= 4 and chisquare(observed[kept], expected).pvalue > 1e-4


def test_cpp_temperature_zero_is_argmax():
    x = torch.randn(16, 3000, generator=torch.Generator().manual_seed(6))
    x[5, 100] = x[5, 2000] = 99.0  # a tie goes to the lowest id
    got = Sampler("cpp").sample(x, [SamplingParams(temperature=0, top_k=3)] * 16, [[]] * 16, [0] * 16)
    assert got.tolist() == x.argmax(1).tolist() and got[5] == 100


def test_benchmark_script_toy_run_writes_the_csv(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sampling.py"), "--toy", "--out", str(tmp_path)], check=True, cwd=ROOT,
                   timeout=120)
    with open(tmp_path / "sampling.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"impl", "V", "B", "ms_per_step", "speedup_vs_hf"}
    assert {r["impl"] for r in rows} == {"cpp", "cpp_loop", "reference", "hf"}
    assert all(float(r["ms_per_step"]) > 0 for r in rows)
    assert (tmp_path / "sampling.md").read_text().count("|") > 10
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sampling.py"), "--pool", "--toy", "--out", str(tmp_path)], check=True,
                   cwd=ROOT, timeout=120)
    with open(tmp_path / "sampling_pool.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["kind"], r["B"]) for r in rows} == {(k, b) for k in ("greedy", "sample") for b in ("1", "8")}
    assert all(float(r["us_one_thread"]) > 0 and float(r["us_pool"]) > 0 for r in rows)


def test_cpp_releases_the_gil_while_sampling():
    import threading
    import time

    from engine import _sampler, sampling

    B = 64  # full-vocabulary draws over 128256 tokens: a few hundred ms in C++
    x = torch.randn(B, 128256, generator=torch.Generator().manual_seed(7)).numpy()
    args = ([sampling._cpp_params(SamplingParams())] * B, [[]] * B, [0] * B, list(range(B)), 2)
    stamps, running = [], threading.Event()
    running.set()

    def ticker():  # runs Python code, so only while the main thread does not hold the GIL
        while running.is_set():
            stamps.append(time.perf_counter())

    th = threading.Thread(target=ticker)
    th.start()
    try:
        t0 = time.perf_counter()
        _sampler.sample(x, *args)
        t1 = time.perf_counter()
    finally:
        running.clear()
        th.join()
    quarter = (t1 - t0) / 4  # the middle half of the call: unreachable for the ticker if the GIL were held
    assert any(t0 + quarter < s < t1 - quarter for s in stamps), f"no Python ran during {t1 - t0:.3f} s of C++ sampling"


def test_greedy_fast_path_picks_what_the_full_chain_picks():
    # temperature 0 with nothing else is one argmax pass over the float32 row; a zero bias sends
    # the same request through the whole chain (float64 copy, bias, argmax)
    rng = random.Random(8)
    fast, full = SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={0: 0.0})
    for _ in range(40):
        V = rng.choice([1, 3, 8, 9, 17, 2048, 4099])
        x = random_logits(rng, 8, V)
        x[0] = 0.25  # a whole row of ties
        x[1, V // 2 :] = 1e30  # ties at the top, first one mid-row
        if V > 1:
            x[2, 0], x[2, 1:] = 0.0, -0.0  # +0 and -0 compare equal: the lowest id wins
        cpp = Sampler("cpp")
        want = cpp.sample(x, [full] * 8, [[]] * 8, [0] * 8)
        assert cpp.sample(x, [fast] * 8, [[]] * 8, [0] * 8).tolist() == want.tolist() == x.argmax(1).tolist()
        loop = DecodeLoop([fast] * 8, [[0]] * 8, impl="cpp")
        assert loop.step(x).tolist() == want.tolist()


@pytest.mark.parametrize("bad, message", [(math.nan, "row 1 contains NaN"), (math.inf, r"row 1 contains \+inf"),
                                          (None, "row 1 is -inf everywhere")])
def test_greedy_fast_path_raises_like_the_full_chain(bad, message):
    x = torch.randn(3, 50)
    if bad is None:
        x[1] = -math.inf
    else:
        x[1, 7] = bad
    for p in (SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={0: 0.0})):
        with pytest.raises(ValueError, match=message):
            Sampler("cpp").sample(x, [p] * 3, [[]] * 3, [0] * 3)


def test_torchs_openmp_threads_give_the_tokens_one_thread_gives(monkeypatch):
    from engine import _sampler, sampling

    rng = random.Random(9)
    V, B, steps = 300, 24, 6
    params = [random_params(rng, V) for _ in range(B)]
    params[:4] = [SamplingParams(temperature=0, max_new_tokens=3)] * 4  # argmax-only rows that finish early
    prompts = [[rng.randrange(V) for _ in range(5)] for _ in range(B)]
    g = torch.Generator().manual_seed(10)
    logits = [torch.randn(B, V, generator=g) for _ in range(steps)]
    default = _sampler.pool_min_work()
    calls = _sampler.pool_calls()
    runs = []
    try:
        for threads, min_work in ((1, default), (4, 0)):  # min_work 0: every step goes to the OpenMP threads
            monkeypatch.setattr(sampling, "_default_threads", lambda threads=threads: threads)
            _sampler.set_pool_min_work(min_work)
            loop = DecodeLoop(params, prompts, impl="cpp")
            tokens = torch.stack([loop.step(x) for x in logits])
            logprobs = torch.tensor([lp for row in loop.logprobs for lp in row])
            runs.append((tokens, logprobs, *Sampler("cpp").sample_with_logprobs(logits[0], params, prompts, [5] * B)))
    finally:
        _sampler.set_pool_min_work(default)
    assert _sampler.pool_calls() >= calls + steps  # the second run's steps really went there
    for one_thread, pool in zip(*runs):
        assert torch.allclose(one_thread, pool, rtol=0, atol=0, equal_nan=True)  # bit for bit


def test_a_step_returns_a_fresh_tensor_and_checks_shapes_after_the_first_step():
    loop = DecodeLoop([SamplingParams(temperature=0, max_new_tokens=5)] * 2, [[1], [2]], impl="cpp")
    first = loop.step(torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]))
    loop.step(torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    assert first.tolist() == [1, 0]  # not overwritten by the next step
    with pytest.raises(InputError, match="B=2"):
        loop.step(torch.zeros(3, 3))
    with pytest.raises(InputError, match="V=3 to V=4"):
        loop.step(torch.zeros(2, 4))
    assert loop.generated == [[1, 2], [0, 1]]


def test_the_greedy_row_finds_its_first_maximum_at_every_position():
    # the search compares blocks of 16 values: a maximum at each position of rows that end inside a
    # block, with a second, equal maximum after it (ties go to the lowest id) and -0 / +0 below it
    for V in (1, 15, 16, 17, 33, 2053):
        x = torch.zeros(V, V)
        x[:, 1::2] = -0.0
        for at in range(V):
            x[at, at] = 3.0
            x[at, min(V - 1, at + 1 + at % 7)] = 3.0
        loop = DecodeLoop([SamplingParams(temperature=0)] * V, [[0]] * V, impl="cpp")
        assert loop.step(x).tolist() == list(range(V))


def test_a_step_takes_numpy_logits_and_can_return_its_own_buffer():
    """The CPU decode step hands NumPy arrays over (read in place by the C++ core); copy=False returns
    the loop's token buffer, which the next step overwrites. float64 arrays take the tensor path."""
    for impl in ("cpp", "reference"):
        loop = DecodeLoop([SamplingParams(temperature=0, max_new_tokens=5)] * 2, [[1], [2]], impl=impl)
        first = loop.step(torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]).numpy(), copy=False)
        assert first.tolist() == [1, 0]
        loop.step(torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64).numpy(), copy=False)
        assert first.tolist() == [2, 1]  # the same buffer, overwritten
        assert loop.generated == [[1, 2], [0, 1]]
        with pytest.raises(InputError, match="B=2"):
            loop.step(torch.zeros(3, 3).numpy())
    with pytest.raises(InputError, match="C-contiguous float32"):  # the C++ core's own check
        loop = DecodeLoop([SamplingParams(temperature=0)] * 2, [[1], [2]], impl="cpp")
        loop.step(torch.zeros(3, 2).numpy().T)


def test_the_stepper_is_the_cores_own_entry_and_checks_what_it_reads():
    """DecodeLoop.stepper(x) for float32 NumPy logits is the C++ core's plain CPython function: the
    same tokens as step(copy=False), and every check that step's Python would have made is made
    in C++ (shape, dtype, byte order, layout, vocabulary size, bad values), with the same errors."""
    rng = np.random.default_rng(0)
    params = [SamplingParams(temperature=0.0, max_new_tokens=50), SamplingParams(seed=3, top_k=5, logprobs=True, max_new_tokens=4)]
    a, b = (DecodeLoop(params, [[1, 2], [3]], impl="cpp") for _ in range(2))
    x = rng.standard_normal((2, 40), dtype=np.float32)
    a.step(x, copy=False)
    b.step(x, copy=False)
    step = b.stepper(x)
    assert type(step).__name__ == "builtin_function_or_method"  # not a Python frame
    for _ in range(6):
        x = rng.standard_normal((2, 40), dtype=np.float32)
        ours = step(x)
        assert ours is b._tokens and ours.tolist() == a.step(x, copy=False).tolist()
    assert (a.generated, a.logprobs, a.finished, a.finish_reason, a.running) == (
        b.generated, b.logprobs, b.finished, b.finish_reason, b.running)
    assert b.finish_reason == [None, "length"] and b.running == [0] and len(b.logprobs[1]) == 4 and b.logprobs[0] == []
    bad = {"B=2": np.zeros((3, 40), np.float32), "float32": np.zeros((2, 40)), "NumPy": torch.zeros(2, 40),
           "C-contiguous": np.zeros((40, 2), np.float32).T, "native": np.zeros((2, 40), ">f4"), "V=40 to V=41": np.zeros((2, 41), np.float32)}
    for message, logits in bad.items():
        with pytest.raises(InputError, match=message if message != "native" else "float32"):
            step(logits)
    nan = np.zeros((2, 40), np.float32)
    nan[0, 7] = np.nan
    with pytest.raises(ValueError, match="NaN") as err:
        step(nan)
    assert not isinstance(err.value, InputError) and b.generated[0] == a.generated[0]  # nothing changed
    loop = DecodeLoop([SamplingParams(temperature=0.0)], [[1]], impl="cpp")
    step = loop.stepper(np.zeros((1, 4), np.float32))
    del loop, a, b
    gc.collect()
    assert step(np.array([[0, 0, 1, 0]], np.float32)).tolist() == [2]  # the function keeps its loop alive
    for impl, logits in (("reference", np.zeros((1, 4), np.float32)), ("cpp", torch.zeros(1, 4)), ("cpp", np.zeros((1, 4)))):
        loop = DecodeLoop([SamplingParams(temperature=0.0)], [[1]], impl=impl)
        loop.step(logits)
        step = loop.stepper(logits)
        assert isinstance(step, functools.partial) and step(logits).tolist() == [0]
