"""Generation: the KV cache changes nothing, batching changes nothing, stops stop."""
import contextlib

import pytest
import torch

from engine import GPT, GPTConfig
from engine.errors import InputError
from engine.generate import PhaseTimer, decode_steps, generate, stream
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["the cat sat on the mat. a dog ran far away! " * 20, "hello world, 你好 🙂"], vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32)
    return GPT(cfg, backend="torch").double().eval()  # float64: no near-tie can flip a choice


def recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence through the model every step."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_kv_cache_generation_equals_full_recomputation(model):
    prompts = [[5, 9, 11], [7] * 11, [3, 1, 4, 1, 5, 9, 2]]  # different lengths: left padding
    params = [SamplingParams(temperature=0.0, max_new_tokens=15)] * 3
    for _, loop in decode_steps(model, prompts, params, sampler="reference"):
        pass
    for prompt, got in zip(prompts, loop.generated):
        assert got == recompute_greedy(model, prompt, 15)
    assert loop.finish_reason == ["length"] * 3


def test_seeded_request_is_the_same_alone_and_in_a_batch(model, tok):
    mine = SamplingParams(temperature=1.0, top_k=40, seed=1234, max_new_tokens=20)
    alone = generate(model, tok, ["the cat"], mine, sampler="reference")[0]
    again = generate(model, tok, ["the cat"], mine, sampler="reference")[0]
    others = [SamplingParams(temperature=0.7, seed=s, max_new_tokens=12) for s in range(3)]
    batch = generate(model, tok, ["a dog ran far away and then", "the cat", "hello", "x"], [others[0], mine, others[1], others[2]], sampler="reference")
    assert alone.token_ids == again.token_ids == batch[1].token_ids
    assert alone.seed == 1234


def test_unseeded_requests_record_their_seed_for_replay(model, tok):
    first = generate(model, tok, "the", SamplingParams(max_new_tokens=10), sampler="reference")[0]
    replay = generate(model, tok, "the", SamplingParams(max_new_tokens=10, seed=first.seed), sampler="reference")[0]
    assert replay.token_ids == first.token_ids


def test_stop_token_and_stop_string(model, tok):
    greedy = generate(model, tok, "the cat", SamplingParams(temperature=0.0, max_new_tokens=30), sampler="reference")[0]
    stop_id = greedy.token_ids[4]
    out = generate(model, tok, "the cat", SamplingParams(temperature=0.0, max_new_tokens=30, stop_token_ids=(stop_id,)), sampler="reference")[0]
    assert out.finish_reason == "stop_token"
    assert out.token_ids == greedy.token_ids[: greedy.token_ids.index(stop_id) + 1]
    assert out.text == tok.decode(out.token_ids[:-1])
    stop = greedy.text[3:6]
    cut = generate(model, tok, "the cat", SamplingParams(temperature=0.0, max_new_tokens=30, stop=(stop,)), sampler="reference")[0]
    assert cut.finish_reason == "stop_string"
    assert cut.text == greedy.text[: greedy.text.find(stop)]
    assert stop not in cut.text


def test_stream_pieces_join_to_the_completion(model, tok):
    params = SamplingParams(temperature=0.9, seed=7, max_new_tokens=25)
    full = generate(model, tok, "hello", params, sampler="reference")[0]
    pieces = list(stream(model, tok, "hello", params, sampler="reference"))
    assert "".join(pieces) == full.text
    assert len(pieces) > 1


def test_bad_requests_raise_input_error(model, tok):
    with pytest.raises(InputError, match="exceeds the model's context of 96"):
        generate(model, tok, "the cat " * 10, SamplingParams(max_new_tokens=90), sampler="reference")
    with pytest.raises(InputError, match="prompt must hold at least one token"):
        generate(model, tok, [[]], sampler="reference")
    with pytest.raises(InputError, match="params has 1 entries for 2 prompts"):
        next(decode_steps(model, [[1], [2]], [SamplingParams()]))
    with pytest.raises(InputError, match="non-empty"):
        next(decode_steps(model, [], []))


def test_the_phase_hook_sees_every_phase_in_order(model):
    names = []

    def hook(name):
        names.append(name)
        return contextlib.nullcontext()

    for _ in decode_steps(model, [[1, 2, 3]], [SamplingParams(temperature=0, max_new_tokens=3)], phase=hook):
        pass
    assert names == ["prefill", "sampling", "forward", "sampling", "forward", "sampling"]


def test_phase_timer_adds_up_every_phase_and_changes_no_token(model):
    prompts, params = [[5, 9, 11], [7, 1]], [SamplingParams(temperature=0.8, seed=3, max_new_tokens=6)] * 2
    timer = PhaseTimer()
    for _, timed in decode_steps(model, prompts, params, phase=timer):
        pass
    for _, plain in decode_steps(model, prompts, params):
        pass
    assert timed.generated == plain.generated
    assert timer.calls == {"prefill": 1, "sampling": 6, "forward": 5}
    assert all(timer.seconds[name] > 0 for name in timer.calls)
