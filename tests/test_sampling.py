"""The reference sampler, SamplingParams and DecodeLoop (engine/sampling.py), checked from the definitions."""
import math
import warnings
from collections import Counter

import pytest
import torch

from engine import sampling
from engine.errors import InputError
from engine.sampling import DecodeLoop, Sampler, SamplingParams, process_logits, uniforms

IMPLS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(
    sampling._extension() is None, reason="the C++ extension engine._sampler is not built (pip install -e .)"))]


def sample(logits, params, prev=None, positions=None):
    B = logits.shape[0]
    prev = [[] for _ in range(B)] if prev is None else prev
    positions = [0] * B if positions is None else positions
    return Sampler("reference").sample(logits, params, prev, positions)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan),
        ("top_k", -1), ("top_k", 2.5), ("top_k", True),
        ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan),
        ("min_p", -0.01), ("min_p", 1.5),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
        ("presence_penalty", 2.01), ("presence_penalty", -2.5),
        ("frequency_penalty", 3.0), ("frequency_penalty", -2.01),
        ("max_new_tokens", 0), ("max_new_tokens", 1.5),
        ("seed", -1), ("seed", 2**64), ("seed", 1.0),
        ("logit_bias", {-1: 1.0}), ("logit_bias", {3: math.nan}), ("logit_bias", {3: math.inf}), ("logit_bias", [1, 2]),
        ("stop", ("",)), ("stop", (3,)),
        ("stop_token_ids", (-1,)), ("stop_token_ids", ("a",)),
        ("logprobs", 1),
    ],
)
def test_out_of_range_params_raise_naming_the_field(field, value):
    with pytest.raises(InputError, match=field):
        SamplingParams(**{field: value})


def test_params_edges_are_accepted_and_normalised():
    p = SamplingParams(temperature=0, top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2, seed=2**64 - 1,
                       logit_bias={5: -math.inf}, stop="###", stop_token_ids=[7, 8])
    assert p.stop == ("###",) and p.stop_token_ids == (7, 8) and p.logit_bias[5] == -math.inf
    # frozen and hashable although it holds a mapping: equal params are one key, the bias counts
    twin = SamplingParams(**{f: getattr(p, f) for f in ("temperature", "top_p", "min_p", "presence_penalty",
                                                         "frequency_penalty", "seed", "stop", "stop_token_ids")},
                          logit_bias={5: -math.inf})
    assert twin == p and hash(twin) == hash(p) and len({p, twin}) == 1
    assert SamplingParams(**{**vars(twin), "logit_bias": {5: 1.0}}) != p
    with pytest.raises(dataclasses_error()):
        p.top_k = 3


def dataclasses_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_id_beyond_vocab_and_bad_inputs_raise_input_error(impl):
    x = torch.zeros(1, 10)
    sampler = Sampler(impl)
    with pytest.raises(InputError, match=r"12.*V=10"):
        sampler.sample(x, [SamplingParams(logit_bias={12: 1.0})], [[]], [0])
    with pytest.raises(InputError, match="V=10"):
        sampler.sample(x, [SamplingParams()], [[3, 10]], [0])
    with pytest.raises(InputError, match="B=1"):
        sampler.sample(torch.zeros(2, 10), [SamplingParams()], [[]], [0])
    with pytest.raises(InputError, match="positions"):
        sampler.sample(x, [SamplingParams()], [[]], [-1])
    with pytest.raises(InputError, match="impl"):
        Sampler("fast")


def test_nan_inf_and_all_masked_rows_raise_naming_the_row():
    x = torch.randn(3, 20)
    params = [SamplingParams(seed=0)] * 3
    bad = x.clone()
    bad[2, 5] = math.nan
    with pytest.raises(ValueError, match="row 2.*NaN"):
        sample(bad, params)
    bad = x.clone()
    bad[1] = -math.inf
    with pytest.raises(ValueError, match="row 1.*-inf"):
        sample(bad, params)
    bad = x.clone()
    bad[0, 3] = math.inf
    with pytest.raises(ValueError, match=r"row 0.*\+inf"):
        sample(bad, params)
    banned = dict.fromkeys(range(20), -math.inf)
    with pytest.raises(ValueError, match="row 0.*-inf"):
        sample(x[:1], [SamplingParams(temperature=0, logit_bias=banned)])


# ----------------------------------------------------------------------------- the stages


def test_penalties_and_bias_follow_the_formulas():
    row = torch.tensor([2.0, -2.0, 0.5, -0.5, 0.0, 1.0])
    p = SamplingParams(repetition_penalty=1.5, presence_penalty=0.25, frequency_penalty=0.5, logit_bias={5: 3.0, 0: -1.0})
    counts = Counter([0, 0, 1, 3, 3, 3, 4])
    x = process_logits(row, p, counts)
    want = [2 / 1.5 - (0.25 + 0.5 * 2) - 1.0, -2 * 1.5 - 0.75, 0.5, -0.5 * 1.5 - (0.25 + 1.5), 0.0 - 0.75, 1.0 + 3.0]
    assert x.dtype == torch.float64
    assert x.tolist() == pytest.approx(want, abs=1e-12)


def test_temperature_zero_is_argmax_with_ties_to_the_lowest_id():
    torch.manual_seed(0)
    x = torch.randn(8, 100)
    x[3, 10] = x[3, 70] = x[3].max() + 1  # a tie
    params = [SamplingParams(temperature=0, top_k=5, top_p=0.3, min_p=0.5, seed=b) for b in range(8)]
    got = sample(x, params)
    assert got.tolist() == x.argmax(dim=1).tolist()
    assert got[3] == 10


def test_top_k_keeps_exactly_k_with_ties_to_the_lowest_ids():
    x = torch.zeros(1, 50)
    x[0, 40] = 0.5  # the top token, then a 49-way tie
    drawn = {int(sample(x, [SamplingParams(top_k=3, seed=s)])[0]) for s in range(200)}
    assert drawn == {40, 0, 1}


def test_top_p_and_min_p_keep_the_documented_sets():
    probs = torch.tensor([[0.05, 0.5, 0.25, 0.2]])
    x = probs.log()
    def drawn(**kw):
        return {int(sample(x, [SamplingParams(seed=s, **kw)])[0]) for s in range(300)}
    assert drawn(top_p=0.45) == {1}
    assert drawn(top_p=0.6) == {1, 2}  # 0.5 < 0.6 <= 0.75
    assert drawn(top_p=0.9) == {1, 2, 3}
    assert drawn(min_p=0.45) == {1, 2}  # keep p >= 0.225
    assert drawn(top_p=0.78) == {1, 2, 3}  # 0.75 < 0.78
    assert drawn(top_k=3, top_p=0.78) == {1, 2}  # top-p on the top-k survivors: 0.5/0.95 < 0.78 <= 0.75/0.95
    assert drawn() == {0, 1, 2, 3}


def test_draws_follow_the_filtered_renormalised_softmax():
    from scipy.stats import chisquare

    torch.manual_seed(1)
    V, n = 12, 3000
    x = torch.randn(1, V) * 1.5
    p = SamplingParams(temperature=0.7, top_k=8, top_p=0.9, seed=1234)
    toks = Sampler("reference").sample(x.expand(n, V), [p] * n, [[]] * n, list(range(n)))
    # expected: the documented filter, from plain softmax arithmetic
    probs = torch.softmax(x[0].double() / 0.7, 0)
    order = torch.sort(probs, descending=True, stable=True).indices[:8]
    kept = order[: int((torch.cumsum(probs[order], 0) < 0.9 * probs[order].sum()).sum()) + 1]
    expected = torch.zeros(V, dtype=torch.float64)
    expected[kept] = probs[kept] / probs[kept].sum()
    observed = torch.bincount(toks, minlength=V).double()
    assert observed[expected == 0].sum() == 0
    assert chisquare(observed[kept], expected[kept] * n).pvalue > 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_equal_log_softmax_of_the_processed_logits(impl):
    x = torch.randn(3, 1000) * 4
    prev = [[1, 1, 5, 9], [], [7] * 10]
    params = [
        SamplingParams(temperature=0.6, top_k=4, repetition_penalty=1.3, presence_penalty=0.5, logprobs=True, seed=1),
        SamplingParams(temperature=0, logit_bias={9: 2.0}, logprobs=True),
        SamplingParams(temperature=1.7, top_p=0.5, frequency_penalty=-1.0, logprobs=True, seed=2),
    ]
    toks, lps = Sampler(impl).sample_with_logprobs(x, params, prev, [4, 0, 10])
    for b, p in enumerate(params):
        processed = process_logits(x[b], p, Counter(prev[b])) / (p.temperature or 1.0)
        want = torch.log_softmax(processed, 0)[toks[b]]
        assert lps[b].item() == pytest.approx(want.item(), abs=1e-9)
    toks2, lps2 = Sampler("reference").sample_with_logprobs(x, [SamplingParams(seed=1)] * 3, prev, [0] * 3)
    assert torch.isnan(lps2).all()


# ----------------------------------------------------------------------------- the RNG


def test_uniforms_match_the_documented_integer_formula():
    seed, pos = 2**64 - 5, 123456789
    ids = torch.tensor([0, 1, 2, 50256, 2**31 - 1])
    k = sampling.stream_key(seed, pos)
    want = [((sampling._mix64((k + (i + 1) * sampling._GAMMA) & sampling._MASK64) >> 11) + 0.5) * 2.0**-53 for i in ids.tolist()]
    got = uniforms(seed, pos, ids)
    assert got.tolist() == want
    assert 0 < got.min() and got.max() < 1


def test_seeded_sampling_reproduces_and_seeds_matter():
    torch.manual_seed(3)
    x = torch.randn(1, 1000)
    p = SamplingParams(seed=7)
    a = [int(sample(x, [p], positions=[i])[0]) for i in range(20)]
    b = [int(sample(x, [p], positions=[i])[0]) for i in range(20)]
    c = [int(sample(x, [SamplingParams(seed=8)], positions=[i])[0]) for i in range(20)]
    assert a == b and a != c
    assert len(set(a)) > 10  # the position moves the stream


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_a_batch():
    torch.manual_seed(4)
    V, steps = 300, 12
    logits = torch.randn(steps, 9, V)
    target = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=99)
    others = [SamplingParams(temperature=t, top_k=k, seed=s) for t, k, s in [(0, 0, 1), (1.5, 5, 2), (0.3, 0, None)] * 3][:8]
    prompt = [5, 6, 7]

    def run(batch_params, row):
        loop = DecodeLoop(batch_params, [prompt] * len(batch_params), impl="reference")
        for t in range(steps):
            step_logits = logits[t].clone()
            step_logits[row] = logits[t, 0]  # the target always sees the same logits
            loop.step(step_logits[: len(batch_params)])
        return loop.generated[row]

    alone = run([target], 0)
    assert run(others[:4] + [target] + others[4:], 4) == alone
    assert run([target] + others[::-1], 0) == alone


# ----------------------------------------------------------------------------- DecodeLoop


def test_decode_loop_matches_stateless_calls_and_records_seeds():
    torch.manual_seed(5)
    V = 50
    params = [SamplingParams(temperature=0.8, repetition_penalty=1.4, frequency_penalty=0.3, logprobs=True, max_new_tokens=6),
              SamplingParams(top_k=3, seed=11, max_new_tokens=4)]
    prompts = [[1, 2, 3, 3], [4]]
    loop = DecodeLoop(params, prompts, impl="reference")
    assert loop.seeds[1] == 11 and 0 <= loop.seeds[0] < 2**64
    steps = [torch.randn(2, V) for _ in range(7)]
    outs = [loop.step(s) for s in steps]
    assert loop.all_finished and loop.finish_reason == ["length", "length"]
    assert [len(g) for g in loop.generated] == [6, 4] and len(loop.logprobs[0]) == 6 and loop.logprobs[1] == []
    assert outs[4][1] == -1 and outs[6].tolist() == [-1, -1]
    # replay each step with the stateless sampler, seeds fixed to the recorded ones
    replay = [SamplingParams(temperature=0.8, repetition_penalty=1.4, frequency_penalty=0.3, seed=loop.seeds[0]), params[1]]
    for b in range(2):
        for t, tok in enumerate(loop.generated[b]):
            prev = prompts[b] + loop.generated[b][:t]
            got = Sampler("reference").sample(steps[t][b : b + 1], [replay[b]], [prev], [len(prev)])
            assert int(got[0]) == tok


def test_decode_loop_stops_on_token_ids_and_strings_across_token_boundaries():
    V = 6
    token_bytes = [b"a", b"b", b"<e", b"nd>", b"", b"x"]
    def forced(tok):  # logits that make greedy pick `tok`
        x = torch.zeros(1, V)
        x[0, tok] = 10
        return x
    loop = DecodeLoop([SamplingParams(temperature=0, stop=("<end>", "zz"))], [[0]], token_bytes, impl="reference")
    for tok in [0, 2, 4]:
        loop.step(forced(tok))
        assert not loop.finished[0]
    loop.step(forced(3))  # "<e" + "" + "nd>" completes the stop string
    assert loop.finished[0] and loop.finish_reason[0] == "stop_string"
    assert loop.step(forced(1)).tolist() == [-1] and loop.generated[0] == [0, 2, 4, 3]

    loop = DecodeLoop([SamplingParams(temperature=0, stop_token_ids=(5,))], [[0]], impl="reference")
    loop.step(forced(1))
    loop.step(forced(5))
    assert loop.finish_reason == ["stop_token"] and loop.generated[0] == [1, 5]

    with pytest.raises(InputError, match="token_bytes"):
        DecodeLoop([SamplingParams(stop=("x",))], [[0]], impl="reference")


def test_decode_loop_error_leaves_state_unchanged():
    loop = DecodeLoop([SamplingParams(seed=0), SamplingParams(seed=1)], [[0], [1]], impl="reference")
    x = torch.randn(2, 8)
    x[1, 2] = math.nan
    with pytest.raises(ValueError, match="row 1"):
        loop.step(x)
    assert loop.generated == [[], []]
    with pytest.raises(InputError, match="V=8"):
        loop.step(torch.randn(2, 9))
    loop2 = DecodeLoop([SamplingParams(logit_bias={8: 1.0})], [[0]], impl="reference")
    with pytest.raises(InputError, match="8.*V=8"):
        loop2.step(torch.randn(1, 8))


@pytest.mark.parametrize("impl", IMPLS)
def test_next_input_is_the_tokens_with_a_valid_id_for_finished_rows(impl):
    V = 5
    loop = DecodeLoop([SamplingParams(temperature=0, max_new_tokens=1), SamplingParams(temperature=0, max_new_tokens=3)],
                      [[0], [1]], impl=impl)
    for step in range(3):
        x = torch.zeros(2, V)
        x[:, step + 1] = 1.0
        tokens = loop.step(x).tolist()
        assert loop.next_input.shape == (2, 1)
        for tok, fed in zip(tokens, loop.next_input[:, 0].tolist()):
            assert fed == tok if tok >= 0 else 0 <= fed < V
    assert tokens == [-1, 3]


def test_auto_without_the_extension_warns_once(monkeypatch):
    monkeypatch.setattr(sampling, "_extension", lambda: None)
    monkeypatch.setattr(sampling, "_warned_no_extension", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert Sampler().impl == "reference"
        assert Sampler("auto").impl == "reference"
    assert len([w for w in caught if "reference sampler" in str(w.message)]) == 1
    with pytest.raises(InputError, match="cpp"):
        Sampler("cpp")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_loop_takes_cuda_logits_through_a_pinned_buffer():
    impls = ["reference"] + (["cpp"] if sampling._extension() is not None else [])
    x = torch.randn(3, 1000, dtype=torch.bfloat16)
    params = [SamplingParams(top_k=20, seed=b, logprobs=True) for b in range(3)]
    for impl in impls:
        on_cpu, on_gpu = DecodeLoop(params, [[1]] * 3, impl=impl), DecodeLoop(params, [[1]] * 3, impl=impl)
        for _ in range(4):
            assert on_gpu.step(x.cuda()).tolist() == on_cpu.step(x).tolist()
        assert on_gpu._buf.is_pinned() and on_gpu.logprobs == on_cpu.logprobs
