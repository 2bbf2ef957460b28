"""Generation: the KV cache changes nothing, batching changes nothing, stops stop."""
import contextlib
import os
import warnings

import pytest
import torch

from engine import GPT, GPTConfig
from engine.errors import InputError
from engine import generate as generate_module
from engine.generate import KVCache, PhaseTimer, decode_steps, generate, stream
from engine.sampling import DecodeLoop, SamplingParams
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


def test_the_model_runs_in_inference_mode_and_the_caller_between_steps_does_not(model):
    """decode_steps enters inference mode around each forward, not around the generator: a caller
    that trains or records autograd between steps must not find the mode left on."""
    modes = []
    hook = model.register_forward_hook(lambda *args: modes.append(torch.is_inference_mode_enabled()))  # (the C++ step
    try:  # does not apply with a hook: every step runs the model's forward, as on a GPU or with other backends)
        for compile in (False, True):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # compile=True on the CPU says it runs eagerly
                for _, loop in decode_steps(model, [[1, 2, 3], [4]], [SamplingParams(temperature=0, max_new_tokens=4)] * 2,
                                            compile=compile):
                    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    finally:
        hook.remove()
    assert modes == [True] * 8 and loop.all_finished
    for _, loop in decode_steps(model, [[1, 2, 3]], [SamplingParams(temperature=0, max_new_tokens=3)]):  # the C++ step
        assert not torch.is_inference_mode_enabled()


# ----------------------------------------------------------------------------- static-shape decode (compile=True)


def small_config(arch: str, **overrides) -> GPTConfig:
    """Two layers, 4 heads of 16 (Llama: 2 K/V heads, GQA), 97 tokens."""
    preset = {"gpt2": "tiny", "llama": "llama-tiny"}[arch]
    gqa = dict(n_kv_head=2) if arch == "llama" else {}
    return GPTConfig.from_preset(preset, **{"vocab_size": 97, "n_layer": 2, "n_head": 4, "n_embd": 64, **gqa, **overrides})


def static_and_growing_logits(model, steps: int, prompt_len: int = 7):
    """Logits of a left-padded prefill and `steps` greedy decode steps, on a growing cache and on the
    same cache made static (whole-cache attention with kv_lens, positions in a tensor)."""
    idx = torch.randint(0, model.config.vocab_size, (3, prompt_len))
    kv_start = torch.tensor([0, prompt_len // 3, prompt_len - 2])
    dtype = next(model.parameters()).dtype
    out = []
    for static in (False, True):
        cache = KVCache(model.config, 3, prompt_len + steps, "cpu", dtype)
        cache.k.fill_(float("nan")), cache.v.fill_(float("nan"))  # what torch.empty may hold
        logits = [model(idx, cache=cache, kv_start=kv_start, last_only=True)[0]]
        if static:
            cache.make_static()
        for _ in range(steps):
            logits.append(model(logits[-1][:, -1].argmax(-1, keepdim=True), cache=cache, kv_start=kv_start)[0])
        out.append(torch.cat(logits, 1))
    return out


@pytest.mark.parametrize("arch,backend", [("gpt2", "reference"), ("gpt2", "torch"), ("llama", "reference"),
                                          ("llama", "torch"), ("llama", "triton")])  # (the kernel: test_attention)
def test_static_cache_steps_equal_growing_cache_steps(arch, backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = small_config(arch, block_size=32, n_layer=1 if backend == "triton" else 2)  # (the interpreter is slow)
    model = GPT(cfg, backend=backend).eval()
    model = model if backend == "triton" else model.double()  # the interpreter's kernels take fp32
    with torch.no_grad():
        growing, static = static_and_growing_logits(model, steps=3 if backend == "triton" else 6)
    assert (growing - static).abs().max().item() < (1e-5 if backend == "triton" else 1e-12)


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_static_cache_at_the_presets_own_size(preset):
    """The same at a size users run: the preset's whole vocabulary and width, a 200-token prompt, 40 steps."""
    model = GPT(GPTConfig.from_preset(preset), backend="torch").eval().double()
    with torch.no_grad():
        growing, static = static_and_growing_logits(model, steps=40, prompt_len=200)
    assert growing.shape[-1] == model.config.vocab_size >= 2048
    assert (growing - static).abs().max().item() < 1e-12


def test_compile_flag_gives_the_same_tokens_and_says_it_runs_eagerly_on_the_cpu(model, tok):
    prompts = [[5, 9, 11], [7] * 11, [3, 1, 4, 1, 5, 9, 2]]  # different lengths: left padding
    params = [SamplingParams(temperature=0.0, max_new_tokens=15), SamplingParams(temperature=0.0, max_new_tokens=9),
              SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_new_tokens=12, repetition_penalty=1.3)]
    eager = [loop for _, loop in decode_steps(model, prompts, params)][-1]
    with pytest.warns(RuntimeWarning, match="on the CPU the prefill and the static-shape decode steps run eagerly"):
        static = [loop for _, loop in decode_steps(model, prompts, params, compile=True)][-1]
    assert static.generated == eager.generated and eager.finish_reason == ["length"] * 3
    assert generate(model, tok, ["the cat"], params[2], compile=True)[0].token_ids == \
        generate(model, tok, ["the cat"], params[2])[0].token_ids


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_static_decode_step_traces_whole_and_compiles_once_in_20_steps(arch):
    """fullgraph=True: no graph break, so nothing in the step waits for the host (.item(), .tolist(), a
    data-dependent branch); one compile for 20 steps: every step has the same shapes and guards."""
    cfg = small_config(arch, block_size=64)
    model = GPT(cfg, backend="torch").eval()
    kv_start = torch.tensor([0, 2, 5])
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(lambda tokens, cache: model(tokens, cache=cache, kv_start=kv_start)[0],
                         backend=counting_backend, fullgraph=True)
    idx = torch.randint(0, cfg.vocab_size, (3, 7))
    with torch.no_grad():
        cache, growing = KVCache(cfg, 3, 40, "cpu", torch.float32), KVCache(cfg, 3, 40, "cpu", torch.float32)
        logits = model(idx, cache=cache, kv_start=kv_start, last_only=True)[0]
        model(idx, cache=growing, kv_start=kv_start, last_only=True)
        cache.make_static()
        for _ in range(20):
            tokens = logits[:, -1].argmax(-1, keepdim=True)
            logits = step(tokens, cache)
            torch.testing.assert_close(logits, model(tokens, cache=growing, kv_start=kv_start)[0], atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1
    assert cache.pos.tolist() == [27] and growing.pos == 27


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compiled_prefill_traces_whole_and_compiles_once_for_every_length(arch, monkeypatch):
    """compile=True's prefill (a GPU's; here its torch.compile with a counting backend): one graph per
    shape class, so no graph break; the cache and logits equal the eager prefill's; new prompt lengths and batch sizes
    (and new caches) reuse one graph, batch 1 and kv_start specialising once each; made once per
    model, not a submodule."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(generate_module, "_PREFILL_BACKEND", counting_backend)
    torch._dynamo.reset()  # (torch's recompile limit counts every earlier compile of GPT.forward in this process)
    cfg = small_config(arch, block_size=64)
    model = GPT(cfg, backend="torch").eval()
    names = list(model.state_dict())
    prefill = generate_module._compiled_prefill(model)
    assert generate_module._compiled_prefill(model) is prefill and list(model.state_dict()) == names
    with torch.inference_mode():
        # (the first call's sizes differ from the layer and head counts: dynamo's duck sizing would
        # otherwise guard on their equality, and the next batch size would compile again)
        for b, length, padded in ((3, 7, False), (5, 19, False), (4, 12, False), (3, 9, True), (2, 30, True), (1, 5, False),
                                  (1, 8, False)):
            idx = torch.randint(0, cfg.vocab_size, (b, length))
            kv_start = torch.arange(b) % length if padded else None
            compiled, eager = (KVCache(cfg, b, length + 4, "cpu", torch.float32) for _ in range(2))
            got = prefill(idx, cache=compiled, kv_start=kv_start, last_only=True)[0]
            want = model(idx, cache=eager, kv_start=kv_start, last_only=True)[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(compiled.k[:, :, :, :length], eager.k[:, :, :, :length])
            assert compiled.pos == eager.pos == length
    assert len(graphs) == 3  # batch > 1 without kv_start, with it, and batch 1


def eager_capture(captures):
    """_capture_decode_step without CUDA: the same step over the same buffers, run eagerly at each replay,
    which checks that the cache still uses the tensors a CUDA graph would have captured."""
    def capture(model, cache, kv_start, draw, tokens):
        captures.append(cache)
        captured = cache.pos, cache.k, cache.v, draw.state()

        def replay():
            assert cache.static and all(a is b for a, b in zip(captured, (cache.pos, cache.k, cache.v)))
            assert all(a is b for a, b in zip(captured[3], draw.state()))
            logits, _ = model(tokens, cache=cache, kv_start=kv_start)
            ids, logprobs = draw.step(logits[:, -1])
            tokens.copy_(ids.view(-1, 1))
            return ids, logprobs
        return replay
    return capture


def graphed_tokens(model, prompts, params):
    loop = DecodeLoop(params, prompts)
    total = max(map(len, prompts)) + max(p.max_new_tokens for p in params)
    for _ in generate_module._graphed_decode(model, prompts, params, loop, total, lambda name: contextlib.nullcontext()):
        pass
    return loop.generated, loop.finish_reason, loop.logprobs


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the device draw needs a GPU or TRITON_INTERPRET=1")
def test_compiled_decode_keeps_a_graph_per_bucket_and_reloads_it(monkeypatch):
    """compile=True's GPU path with its CUDA graph replaced by the same step run eagerly (the CPU has
    none): calls whose batch and length fall in one bucket (batch 3 and 4 -> 4, 40 and 60 positions ->
    64) reuse its cache, draw and captured step, each loading its rows (left padding, penalties,
    top-k, stop tokens, rows finishing early) into them, and draw what a fresh bucket draws; greedy
    rows take the eager decode's tokens; batch 5 gets a bucket of its own."""
    captures = []
    monkeypatch.setattr(generate_module, "_capture_decode_step", eager_capture(captures))
    monkeypatch.setattr(generate_module, "_PREFILL_BACKEND", "eager")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(small_config("llama", block_size=64), backend="torch").eval()
    sampled = SamplingParams(temperature=0.9, top_k=8, repetition_penalty=1.3, seed=7, max_new_tokens=20)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=25, logprobs=True)  # (log-probs see the whole context)
    calls = [([[5, 9, 11], [7] * 15, [3, 1, 4]], [greedy, sampled, greedy]),
             ([[2, 6], [8, 8, 8, 1], [9] * 35, [4]], [sampled, greedy, SamplingParams(temperature=0.0, max_new_tokens=6,
                                                                                      stop_token_ids=(3,)), greedy]),
             ([[1], [2], [3], [4], [5]], [greedy] * 5)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (the interpreter's overflow notes)
        for prompts, params in calls:
            got = graphed_tokens(model, prompts, params)
            fresh = GPT(model.config, backend="torch").eval()  # the same weights, no bucket yet
            fresh.load_state_dict(model.state_dict())  # (in the other weight layout: log-probs equal to rounding)
            again = graphed_tokens(fresh, prompts, params)
            assert got[:2] == again[:2] and got[2] == [pytest.approx(row, abs=1e-6) for row in again[2]]
            eager = [loop for _, loop in decode_steps(model, prompts, params)][-1]
            for b, p in enumerate(params):
                if p.temperature == 0:
                    assert got[0][b] == eager.generated[b] and got[1][b] == eager.finish_reason[b]
                    assert got[2][b] == pytest.approx(eager.logprobs[b], abs=1e-4)
    buckets = model.__dict__["_decode_graphs"]
    assert [key[:2] for key in buckets] == [(4, 64), (8, 32)]
    assert [c for c in captures if any(c is bucket.cache for bucket in buckets.values())] == [b.cache for b in buckets.values()]
    assert "_decode_graphs" not in str(model.state_dict().keys())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cuda_graph_decode_gives_eager_tokens_and_replays_once_a_step(arch, monkeypatch):
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or real_replay(graph))
    cfg = small_config(arch, block_size=256, vocab_size=512, n_embd=128)
    model = GPT(cfg).cuda().eval()
    prompts = [[5, 9, 11], [7] * 40, [3, 1, 4, 1, 5, 9, 2]]
    params = [SamplingParams(temperature=0.0, max_new_tokens=30)] * 2 + [SamplingParams(temperature=0.8, seed=3, max_new_tokens=30)]
    eager = [loop for _, loop in decode_steps(model, prompts, params)][-1]
    graphed = [loop for _, loop in decode_steps(model, prompts, params, compile=True)][-1]
    assert graphed.generated == eager.generated
    assert len(replays) == 29  # one per decode step after the prefill's token
    assert "_compiled_prefill" in model.__dict__  # the prefill ran compiled (inductor)
    (bucket,) = model.__dict__["_decode_graphs"].values()
    replay = bucket.replay
    other = [[4, 4, 2], [9] * 45, [1] * 5, [6]]  # batch 4, new lengths, total 75: the same bucket (4, 128), graph and prefill
    params = [params[2], params[0], params[1], params[0]]
    assert [loop for _, loop in decode_steps(model, other, params, compile=True)][-1].generated == \
        [loop for _, loop in decode_steps(model, other, params)][-1].generated
    assert model.__dict__["_decode_graphs"] == {next(iter(model.__dict__["_decode_graphs"])): bucket}
    assert bucket.replay is replay and len(replays) == 29 + 29


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_static_decode_step_never_waits_for_the_host_on_a_gpu():
    model = GPT(small_config("llama", block_size=64)).cuda().eval()
    cache = KVCache(model.config, 3, 40, "cuda", torch.bfloat16)
    kv_start = torch.tensor([0, 2, 5], device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 97, (3, 7), device="cuda"), cache=cache, kv_start=kv_start, last_only=True)[0]
        cache.make_static()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):
                logits = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache, kv_start=kv_start)[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cache.pos.item() == 12


def test_the_package_names_of_design_md_are_the_functions(model, tok):
    """DESIGN.md: engine.generate(...) / engine.stream(...), whether or not engine.generate was imported as a module."""
    import engine

    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    assert engine.generate(model, tok, ["the cat"], params)[0].token_ids == generate(model, tok, ["the cat"], params)[0].token_ids
    assert "".join(engine.stream(model, tok, "the cat", params)) == generate(model, tok, "the cat", params)[0].text
