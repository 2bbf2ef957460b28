"""The whole-step C++ decode on the CPU (engine/cpu_decode.py, csrc/decode_step.cpp) against the
model's own forward: GPT-2 and the Llama family (GQA, Qwen3's q/k norms, Qwen2's QKV bias, Llama 3's
RoPE scaling), both weight layouts, left padding, no biases, odd widths, the presets' own sizes, one and two threads, float32 and float64; that generation really
takes it, where it must not, and bad input."""
import pytest
import torch

from engine import GPT, GPTConfig
from engine.cpu_decode import decoder, torch_blas_gemm
from engine.generate import KVCache, decode_steps
from engine.sampling import SamplingParams

_ext = pytest.importorskip("engine._decode_step", reason="the C++ extension engine._decode_step is not built (pip install -e .)")
if torch_blas_gemm("sgemm_") is None:
    pytest.skip("this torch build's CPU library exports no BLAS sgemm_ (the C++ step needs it)", allow_module_level=True)

TOL = {torch.float32: 2e-5, torch.float64: 1e-12}  # relative to the logits' largest magnitude


def model_of(dtype=torch.float32, input_major=True, preset="tiny", **config):
    """A model on the torch backend; config: GPTConfig.from_preset(preset, ...) overrides. Norm weights
    and every bias random (they start as ones and zeros: a swapped or dropped one would not show)."""
    model = GPT(GPTConfig.from_preset(preset, **config), backend="torch").eval().to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model.decode_layout() if input_major else model


def compare_steps(model, lengths, steps, dtype):
    """Prefill left-padded prompts of `lengths` into two caches, then `steps` greedy decode steps:
    the model's forward on one cache, the C++ step on the other. Returns the largest difference of
    the logits (relative to their largest magnitude) and of the caches."""
    B, L = len(lengths), max(lengths)
    idx = torch.randint(0, model.config.vocab_size, (B, L))
    kv_start = torch.tensor([L - n for n in lengths]) if min(lengths) < L else None
    caches = [KVCache(model.config, B, L + steps, "cpu", dtype) for _ in range(2)]
    worst = 0.0
    with torch.inference_mode():
        for cache in caches:
            logits, _ = model(idx, cache=cache, kv_start=kv_start, last_only=True)
        step = decoder(model, caches[1], kv_start)
        assert step is not None
        tokens = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            want = model(tokens, cache=caches[0], kv_start=kv_start)[0][:, -1]
            assert torch.isfinite(want).all()  # (a NaN would compare as no difference below)
            got = torch.from_numpy(step(tokens).copy())  # (the step's array: the next step overwrites it)
            assert got.shape == want.shape and got.dtype == dtype
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
            tokens = want.argmax(-1, keepdim=True)
    assert caches[0].pos == caches[1].pos == L + steps
    cache_diff = max((a - b).abs().max().item() for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)))
    return worst, cache_diff


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("input_major", [True, False])
@pytest.mark.parametrize("lengths", [[5], [9, 3, 1], [1] * 8])
def test_steps_match_the_models_forward(lengths, input_major, dtype):
    worst, cache_diff = compare_steps(model_of(dtype, input_major, n_layer=2, block_size=64), lengths, 6, dtype)
    assert worst < TOL[dtype] and cache_diff < TOL[dtype]


@pytest.mark.parametrize("config", [
    dict(bias=False),  # no bias anywhere
    dict(n_head=2, layer_norm_epsilon=1e-2),  # heads of 64, another epsilon
    dict(n_embd=72, n_head=3, vocab_size=1001),  # head dim 24 (the general attention loop), an odd vocabulary
    dict(n_embd=128, n_head=1, n_layer=1, vocab_size=7),  # one head of 128, a tiny vocabulary
])
def test_other_shapes(config):
    worst, cache_diff = compare_steps(model_of(torch.float64, **{"n_layer": 2, "block_size": 64, **config}), [7, 2], 5,
                                      torch.float64)
    assert worst < 1e-12 and cache_diff < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", [
    dict(),  # llama-tiny: RMSNorm, SwiGLU, RoPE, 2 key/value heads for 4 query heads
    dict(qk_norm=True, attn_bias=True, tie_embeddings=False),  # Qwen3's per-head q/k norms, Qwen2's QKV bias, a separate head
    dict(n_kv_head=1, rope_theta=500000.0, rope_scaling=dict(factor=8.0, original_max_position_embeddings=16,
                                                            low_freq_factor=1.0, high_freq_factor=4.0)),  # Llama 3's RoPE
    dict(n_head=2, n_kv_head=2, head_dim=80, intermediate_size=200),  # heads wider than n_embd / n_head (the general loop)
])
def test_the_llama_family_matches_the_models_forward(config, dtype):
    model = model_of(dtype, preset="llama-tiny", **{"n_layer": 2, "block_size": 64, **config})
    worst, cache_diff = compare_steps(model, [9, 3, 1], 6, dtype)
    assert worst < TOL[dtype] and cache_diff < TOL[dtype]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_the_cpu_presets_at_their_own_size_on_one_and_two_threads(preset, threads, torch_threads):
    """The CPU presets whole (vocabulary 2048, 4 layers of 128), three left-padded prompts of 200,
    57 and 1 tokens (every layer's attention then reads enough to go to torch's OpenMP threads),
    20 steps, float32 as users run it."""
    torch_threads(threads)
    calls = _ext.pool_calls()
    worst, cache_diff = compare_steps(model_of(preset=preset), [200, 57, 1], 20, torch.float32)
    assert worst < TOL[torch.float32] and cache_diff < TOL[torch.float32]
    if threads > 1:
        assert _ext.pool_calls() >= calls + 20 * 4  # every layer's attention went to the OpenMP threads


def test_gpt2_width_and_vocabulary():
    """GPT-2's width (768, 12 heads of 64) and its 50257-token vocabulary (an odd leading dimension
    for the head's GEMM), two layers to keep the test short."""
    worst, cache_diff = compare_steps(model_of(torch.float32, n_layer=2, n_embd=768, n_head=12, vocab_size=50257,
                                               block_size=64), [30, 4], 4, torch.float32)
    assert worst < TOL[torch.float32] and cache_diff < TOL[torch.float32]


def test_generation_takes_the_step_and_gives_the_forwards_tokens(monkeypatch):
    """decode_steps runs the model's forward once (the prefill) and the C++ step after it; greedy
    tokens equal those of the same generation with the C++ step turned off (float64: no near-ties)."""
    model = model_of(torch.float64, n_layer=2, block_size=96)
    prompts = [[5, 9, 11], [7] * 11, [3, 1, 4, 1, 5, 9, 2]]
    params = [SamplingParams(temperature=0.0, max_new_tokens=20)] * 3
    forwards = []
    original = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, *a, **k: forwards.append(1) or original(self, *a, **k))
    fast = [loop for _, loop in decode_steps(model, prompts, params)][-1].generated
    assert len(forwards) == 1
    monkeypatch.setattr("engine.cpu_decode._decode_step", None)  # as without the extension
    plain = [loop for _, loop in decode_steps(model, prompts, params)][-1].generated
    assert len(forwards) == 1 + 20
    assert fast == plain


def test_where_the_step_does_not_apply():
    model = model_of(n_layer=1, block_size=32)
    cache = KVCache(model.config, 1, 16, "cpu", torch.float32)
    assert decoder(model, cache) is not None
    assert model.ops_for(torch.device("cpu")).decoder(model, cache) is not None
    assert model.set_backend("reference").ops_for(torch.device("cpu")).decoder(model, cache) is None  # the plain formulas
    model.set_backend("torch")
    assert decoder(model.train(), cache) is None  # dropout
    model.eval()
    handle = model.transformer.h[0].mlp.register_forward_hook(lambda *a: None)
    assert decoder(model, cache) is None  # the hook would not run
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert decoder(model, cache) is None
    bf16 = model_of(torch.bfloat16, n_layer=1, block_size=32)
    assert decoder(bf16, KVCache(bf16.config, 1, 16, "cpu", torch.bfloat16)) is None
    assert decoder(model, KVCache(model.config, 1, 16, "cpu", torch.float32).make_static()) is None
    assert decoder(model, KVCache(model.config, 1, 16, "cpu", torch.float64)) is None  # cache of another dtype


def test_bad_input_raises_before_anything_is_written():
    model = model_of(n_layer=1, block_size=32)
    cache = KVCache(model.config, 2, 16, "cpu", torch.float32)
    with torch.inference_mode():
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
        step = decoder(model, cache)
        before = cache.k.clone()
        with pytest.raises(ValueError, match=r"token 2048 in row 1 is not in \[0, vocab_size=2048\)"):
            step(torch.tensor([[1], [2048]]))
        with pytest.raises(ValueError, match="tokens must be int64"):
            step(torch.tensor([[1], [2]], dtype=torch.int32))
        with pytest.raises(ValueError, match=r"tokens must be int64 \[B=2\]"):
            step(torch.tensor([1, 2, 3]))
        cache.pos = 16
        with pytest.raises(ValueError, match="at=16 is past the cache"):
            step(torch.tensor([[1], [2]]))
        assert torch.equal(before.view(torch.int32), cache.k.view(torch.int32))  # bit for bit (torch.empty's garbage may hold NaN)
    with pytest.raises(ValueError, match="k_cache and v_cache must be"):
        decoder(model, KVCache(GPTConfig.from_preset("tiny", n_layer=2), 2, 16, "cpu", torch.float32))
    with pytest.raises(ValueError, match="kv_start must be an int64 tensor"):
        decoder(model, cache, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"kv_start\[1\]=-1 is not a column of the cache"):
        decoder(model, cache, torch.tensor([0, -1]))


def test_hostile_values_large_activations_and_nan_weights():
    """Activations in the hundreds (GELU's exp far past float range: exp(-2u) overflows to inf for
    very negative inputs, where GELU is -0) match the forward; a NaN weight gives NaN logits, which
    the sampler refuses the same way on both paths."""
    model = model_of(torch.float32, n_layer=2, block_size=64)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(30.0)
            block.ln_2.weight.mul_(3.0)
    worst, cache_diff = compare_steps(model, [9, 3], 4, torch.float32)
    assert worst < TOL[torch.float32] and cache_diff < TOL[torch.float32]
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.weight[3, 5] = float("nan")
    params = [SamplingParams(temperature=0.0, max_new_tokens=3)]
    for off in (False, True):
        if off:
            model.transformer.h[0].register_forward_hook(lambda *a: None)  # (a hook: the forward runs instead)
        with pytest.raises(ValueError, match="contains NaN"):
            for _ in decode_steps(model, [[1, 2, 3]], params):
                pass
