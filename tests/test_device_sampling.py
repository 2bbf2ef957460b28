"""kernels.sampling (the decode step's draw on the device) picks the C++ sampler's tokens, and
engine.device_sampling.DeviceSampler, driven step by step, the C++ DecodeLoop's.

Random cases: vocabularies of odd sizes, logits with ties (rounded to a coarse grid), every
parameter of the chain on and off, penalties from random previous tokens, logit bias, any seed and
position. The kernel sums the top-p mass in another order than the C++ loop, and its exp and log
may round differently by an ulp, so a case whose top-p cut or min-p test falls within 1e-9
(relative) of its threshold is rebuilt: the two could then disagree legitimately.
"""
import math
import os
import random
from collections import Counter

import pytest
import torch

from engine.device_sampling import DeviceSampler
from engine.errors import InputError
from engine.sampling import DecodeLoop, Sampler, SamplingParams, process_logits
from kernels import sampling as device_sampling

N_CASES = int(os.environ.get("LLM_ENGINE_SAMPLING_CASES", 1000))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter without a GPU (conftest.py)
VOCABS = (1, 2, 7, 129, 513, 1000)  # in the interpreter the kernel walks V in blocks of 512: 1 to 2 blocks


def near_a_boundary(row, p: SamplingParams, counts) -> bool:
    """Whether a top-p cut or a min-p test lies within 1e-9 of its threshold (float64, ranked as the C++ code ranks)."""
    if p.temperature == 0:
        return False
    x = process_logits(row, p, counts)
    order = torch.sort(x, descending=True, stable=True).indices
    if 0 < p.top_k < len(order):
        order = order[: p.top_k]
    w = torch.exp((x[order] - x.max()) / p.temperature)
    n = len(order)
    if p.top_p < 1:
        cum = torch.cumsum(w, 0)
        if ((cum - p.top_p * cum[-1]).abs() <= 1e-9 * cum[-1]).any():
            return True
        n = min(int((cum < p.top_p * cum[-1]).sum()) + 1, n)
    return p.min_p > 0 and bool(((w[:n] - p.min_p).abs() <= 1e-9).any())


def all_masked(row, p: SamplingParams, prev) -> bool:
    """Every token -inf after the bias: the C++ sampler raises (test_bad_rows... covers the kernel's answer)."""
    try:
        process_logits(row, p, Counter(prev))
    except ValueError:
        return True
    return False


def random_case(rng: random.Random):
    V = rng.choice(VOCABS)
    grid = rng.choice((0.0, 0.5))  # 0.5: many exact ties
    row = torch.randn(V, generator=torch.Generator().manual_seed(rng.getrandbits(32))) * rng.choice((1.0, 4.0))
    if grid:
        row = (row / grid).round() * grid
    if V > 2 and rng.random() < 0.2:
        row[rng.sample(range(V), V // 3)] = -math.inf
    prev = [rng.randrange(V) for _ in range(rng.choice((0, 3, 40)))]
    params = SamplingParams(
        temperature=rng.choice((0.0, 0.3, 1.0, 1.7)), top_k=rng.choice((0, 1, 3, max(V - 1, 1), V + 5)),
        top_p=rng.choice((1.0, 1.0, 0.9, 0.5, 0.05)), min_p=rng.choice((0.0, 0.0, 0.02, 0.3)),
        repetition_penalty=rng.choice((1.0, 1.3)), presence_penalty=rng.choice((0.0, 0.4)),
        frequency_penalty=rng.choice((0.0, 0.25)),
        logit_bias={rng.randrange(V): rng.choice((-3.0, 2.5, -math.inf))} if rng.random() < 0.3 else None,
        seed=rng.getrandbits(64), logprobs=rng.random() < 0.3)
    return row, params, prev, rng.randrange(1 << 20)


def device_draw(rows, params, prevs, positions):
    """kernels.sampling.sample on one batch of equal-V rows, its inputs built the way a decode loop would."""
    B, V = len(rows), rows[0].numel()
    vec = lambda f, dtype=torch.float64: torch.tensor([f(p) for p in params], dtype=dtype)  # noqa: E731
    counts = torch.zeros(B, V, dtype=torch.int32)
    for b, prev in enumerate(prevs):
        for tok, n in Counter(prev).items():
            counts[b, tok] = n
    bias = torch.zeros(B, V, dtype=torch.float64)
    for b, p in enumerate(params):
        for tok, add in (p.logit_bias or {}).items():
            bias[b, tok] = add
    seeds = torch.tensor([p.seed - (1 << 64) if p.seed >= 1 << 63 else p.seed for p in params], dtype=torch.int64)
    rp = device_sampling.row_params(
        V, vec(lambda p: p.temperature), vec(lambda p: p.top_k, torch.int64), vec(lambda p: p.top_p),
        vec(lambda p: p.min_p), seeds, repetition=vec(lambda p: p.repetition_penalty),
        presence=vec(lambda p: p.presence_penalty), frequency=vec(lambda p: p.frequency_penalty))
    rp = device_sampling.RowParams(*(t.to(DEVICE) for t in rp))
    counts = counts.to(DEVICE)
    tokens, logprobs = device_sampling.sample(torch.stack(rows).to(DEVICE), rp, torch.tensor(positions, device=DEVICE),
                                              counts=counts, bias=bias.to(DEVICE), logprobs=True)
    return tokens.cpu(), logprobs.cpu(), counts.cpu()


def test_same_tokens_as_the_cpp_sampler_on_random_cases():
    seed = int(torch.randint(0, 1 << 30, ()))  # from conftest's seed, so its replay line replays this
    rng = random.Random(seed)
    cpp = Sampler("cpp")
    cases, rebuilt = [], 0
    while len(cases) < N_CASES:
        row, p, prev, pos = random_case(rng)
        if all_masked(row, p, prev) or near_a_boundary(row, p, Counter(prev)):
            rebuilt += 1
            continue
        cases.append((row, p, prev, pos))
    by_vocab = {}
    for case in cases:
        by_vocab.setdefault(case[0].numel(), []).append(case)
    for V, group in by_vocab.items():
        for i in range(0, len(group), 128):
            rows, params, prevs, positions = map(list, zip(*group[i:i + 128]))
            want, want_lp = cpp.sample_with_logprobs(torch.stack(rows), params, prevs, positions)
            got, got_lp, counts = device_draw(rows, params, prevs, positions)
            bad = (got != want).nonzero().flatten().tolist()
            assert not bad, (f"seed {seed}: V={V}, row {bad[0]}: device {got[bad[0]]} != C++ {want[bad[0]]} "
                             f"({params[bad[0]]})")
            asked = torch.tensor([p.logprobs for p in params])
            torch.testing.assert_close(got_lp[asked], want_lp[asked], rtol=1e-12, atol=1e-12)
            for b, prev in enumerate(prevs):  # the chosen token was counted
                assert counts[b, want[b]] == Counter(prev)[int(want[b])] + 1
    assert rebuilt < N_CASES // 10, f"seed {seed}: {rebuilt} cases fell near a boundary"


def test_bad_rows_are_reported_through_the_token():
    logits = torch.tensor([[0.0, float("nan"), 1.0], [0.0, float("inf"), 1.0], [-math.inf] * 3, [0.0, 2.0, 1.0]],
                          device=DEVICE)
    one = lambda v, dtype=torch.float64: torch.full((4,), v, dtype=dtype, device=DEVICE)  # noqa: E731
    rp = device_sampling.row_params(3, one(1.0), one(0, torch.int64), one(1.0), one(0.0), one(7, torch.int64))
    tokens = device_sampling.sample(logits, rp, one(3, torch.int64))
    assert tokens[:3].tolist() == [device_sampling.NAN_OR_INF, device_sampling.NAN_OR_INF,
                                   device_sampling.ALL_MASKED]
    assert 0 <= tokens[3] < 3
    with pytest.raises(ValueError, match="all together"):
        device_sampling.row_params(3, one(1.0), one(0, torch.int64), one(1.0), one(0.0), one(7, torch.int64),
                                   repetition=one(1.2))
    with pytest.raises(ValueError, match="counts need penalties"):
        device_sampling.sample(logits, rp, one(3, torch.int64), counts=torch.zeros(4, 3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"positions must be a \[4\] tensor"):
        device_sampling.sample(logits, rp, one(3, torch.int64)[:2])
    with pytest.raises(ValueError, match="positions must be int64"):
        device_sampling.sample(logits, rp, one(3, torch.int32))


def test_device_sampler_steps_like_the_cpp_decode_loop():
    """engine.device_sampling.DeviceSampler driven as a decode loop: each step's logits depend on the
    token chosen before (a random bigram table), penalties on (the counts evolve with the tokens),
    rows finishing at different steps; same tokens and log-probs as the C++ DecodeLoop. DecodeLoops fed
    the device's tokens (DecodeLoop.append, C++ and reference cores) end where the sampling one does."""
    seed = int(torch.randint(0, 1 << 30, ()))
    rng = random.Random(seed)
    B, V, steps = 5, 37, 7
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, V, generator=g) * 2
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=r, presence_penalty=pr,
                             frequency_penalty=f, logit_bias=bias, seed=rng.getrandbits(64), max_new_tokens=n, logprobs=lp)
              for t, k, p, m, r, pr, f, bias, n, lp in (
                  (1.0, 0, 0.9, 0.0, 1.3, 0.5, 0.3, None, steps + 1, True),
                  (0.7, 5, 1.0, 0.05, 1.0, 0.0, 0.0, {3: -math.inf, 4: 2.0}, steps, False),  # no penalties: not counted
                  (0.0, 0, 1.0, 0.0, 1.5, 0.5, 1.0, None, 3, True),  # greedy, penalised
                  (1.3, 8, 0.6, 0.0, 0.8, -0.5, -0.2, None, steps, False),
                  (1.0, 0, 1.0, 0.0, 1.0, 0.5, 0.0, None, 2, True))]  # presence penalty only
    prompts = [[rng.randrange(V) for _ in range(n)] for n in (1, 4, 6, 2, 3)]
    cpp = DecodeLoop(params, prompts, impl="cpp")
    device = DeviceSampler(params, prompts, cpp.seeds, V, DEVICE)
    fed = [DecodeLoop(params, prompts, impl=impl) for impl in ("cpp", "reference")]
    history = [list(p) for p in prompts]  # prompt + the device's tokens, finished rows included
    last = torch.tensor([p[-1] for p in prompts])
    for step in range(steps):
        logits = table[last] + 0.3 * torch.randn(B, V, generator=g)
        for b in range(B):  # away from top-p / min-p boundaries, as the C++ loop's counts see the row
            while near_a_boundary(logits[b], params[b], Counter(history[b])):
                logits[b] = torch.randn(V, generator=g) * 2
        running = [b for b in range(B) if not cpp.finished[b]]
        want = cpp.step(logits)
        got, got_lp = device.step(torch.stack([torch.zeros_like(logits), logits], 1).to(DEVICE)[:, -1])  # as decode_steps slices them
        got, got_lp = got.cpu(), got_lp.cpu()
        assert got[running].tolist() == want[running].tolist(), f"seed {seed}: step {step}"
        for b in running:
            if params[b].logprobs:
                assert got_lp[b].item() == pytest.approx(cpp.logprobs[b][-1], rel=1e-12, abs=1e-12), f"seed {seed}"
            else:
                assert math.isnan(got_lp[b])
        device.check(got.tolist(), running)  # no bad row
        for loop in fed:
            assert loop.append(got, got_lp).tolist() == want.tolist()
        for b in range(B):
            history[b].append(int(got[b]))
        last = got
    assert cpp.finished == [False, True, True, True, True]
    for loop in fed:
        assert (loop.generated, loop.finish_reason, loop.finished) == (cpp.generated, cpp.finish_reason, cpp.finished)
        assert [[pytest.approx(x, rel=1e-12) for x in row] for row in loop.logprobs] == cpp.logprobs
    for b in (0, 2, 3, 4):  # rows with penalties: prompt + every drawn token (row 1's counts are never read)
        torch.testing.assert_close(device.counts[b].cpu(), torch.bincount(torch.tensor(history[b]), minlength=V).to(torch.int32))
    assert device.positions.tolist() == [len(p) + steps for p in prompts]


def test_the_draw_traces_whole_under_torch_compile():
    """kernels.sampling's op (llm_engine::sample) under torch.compile(fullgraph=True): a DeviceSampler's
    step, penalties counted in place, compiles with no graph break and draws the eager step's tokens,
    log-probs and counts, step after step, from one graph."""
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs=True, seed=1),
              SamplingParams(temperature=0.9, top_k=5, presence_penalty=0.5, logit_bias={2: 1.5}, seed=2),
              SamplingParams(temperature=1.1, top_p=0.8, frequency_penalty=0.2, seed=3)]
    prompts = [[1, 2], [3], [4, 5, 6]]
    eager, traced = (DeviceSampler(params, prompts, [1, 2, 3], 40, DEVICE) for _ in range(2))
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    step = torch.compile(traced.step, fullgraph=True, backend=counting_backend)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits = torch.randn(3, 40, generator=g).to(DEVICE)
        (want, want_lp), (got, got_lp) = eager.step(logits), step(logits)
        assert got.tolist() == want.tolist()
        torch.testing.assert_close(got_lp, want_lp, equal_nan=True)
    assert torch.equal(traced.counts, eager.counts) and torch.equal(traced.positions, eager.positions)
    assert len(graphs) == 1


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_decode_loop_append_rejects_what_is_not_a_drawn_step(impl):
    loop = DecodeLoop([SamplingParams(max_new_tokens=3)] * 2, [[0], [1]], impl=impl)
    with pytest.raises(InputError, match=r"must both be \[B\] = \[2\]"):
        loop.append(torch.tensor([1, 2, 3]))
    with pytest.raises(InputError, match=r"tokens\[1\] = -2 is not a token id"):
        loop.append(torch.tensor([1, -2]))
    assert loop.generated == [[], []]  # nothing recorded by a refused step
    assert loop.append(torch.tensor([4, 5])).tolist() == [4, 5] and loop.generated == [[4], [5]]


def test_device_sampler_rejects_bad_input():
    p = SamplingParams(logit_bias={9: 1.0})
    with pytest.raises(InputError, match="V=5"):
        DeviceSampler([p], [[0]], [1], 5, "cpu")
    with pytest.raises(InputError, match="V=5"):
        DeviceSampler([SamplingParams()], [[0, 5]], [1], 5, "cpu")
    with pytest.raises(InputError, match="same length"):
        DeviceSampler([SamplingParams()], [[0], [1]], [1], 5, "cpu")
    with pytest.raises(InputError, match="vocab_size"):
        DeviceSampler([SamplingParams()], [[0]], [1], 0, "cpu")
    sampler = DeviceSampler([SamplingParams(), SamplingParams()], [[0], [1]], [1, 2], 5, "cpu")
    with pytest.raises(InputError, match=r"\[B=2, V=5\]"):
        sampler.step(torch.zeros(2, 6))
    tokens, _ = sampler.step(torch.tensor([[0.0, float("nan"), 1, 2, 3], [-math.inf] * 5]))
    with pytest.raises(ValueError, match="row 0 contains NaN"):
        sampler.check(tokens.tolist(), [0, 1])
    with pytest.raises(ValueError, match="row 1 is -inf everywhere"):
        sampler.check(tokens.tolist(), [1])
    sampler.check(tokens.tolist(), [])  # finished rows are not checked


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_sampler_step_replayed_from_a_cuda_graph():
    """DeviceSampler.step captured once in a CUDA graph and replayed every step, at GPT-2's
    vocabulary: the C++ DecodeLoop's tokens and log-probs, the counts and positions advancing on
    the device."""
    seed = int(torch.randint(0, 1 << 30, ()))
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, V, steps = 4, 50257, 6
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, repetition_penalty=1.2, frequency_penalty=0.1,
                             seed=rng.getrandbits(64), max_new_tokens=steps, logprobs=True)
              for t, k, p in ((0.8, 50, 0.9), (0.0, 0, 1.0), (1.0, 0, 0.95), (1.3, 1000, 1.0))]
    prompts = [[rng.randrange(V) for _ in range(n)] for n in (3, 1, 7, 2)]
    cpp = DecodeLoop(params, prompts, impl="cpp")
    logits = torch.zeros(B, V, device="cuda")
    DeviceSampler(params, prompts, cpp.seeds, V, "cuda").step(logits)  # compiles the kernel before the capture
    sampler = DeviceSampler(params, prompts, cpp.seeds, V, "cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, logprobs = sampler.step(logits)
    history = [list(p) for p in prompts]
    for step in range(steps):
        x = torch.randn(B, V, generator=g) * 3
        for b in range(B):
            while near_a_boundary(x[b], params[b], Counter(history[b])):
                x[b] = torch.randn(V, generator=g) * 3
        logits.copy_(x)
        graph.replay()
        want = cpp.step(x)
        assert tokens.tolist() == want.tolist(), f"seed {seed}: step {step}"
        torch.testing.assert_close(logprobs.cpu(), torch.tensor([lp[-1] for lp in cpp.logprobs], dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)
        for b in range(B):
            history[b].append(int(want[b]))
    for b in range(B):
        torch.testing.assert_close(sampler.counts[b].cpu(), torch.bincount(torch.tensor(history[b]), minlength=V).to(torch.int32))
    assert sampler.positions.tolist() == [len(p) + steps for p in prompts]
