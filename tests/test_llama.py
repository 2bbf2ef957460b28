"""The Llama family (arch "llama"): config and presets, the ops in every backend, the model
(KV cache, left padding, loss_mask), Hugging Face Llama / Qwen2 / Qwen3 in and out, and the CLI.

Hugging Face models are built from small configs with random weights: nothing is downloaded.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from engine import GPT, GPTConfig, reference
from engine.backends import get_backend
from engine.errors import InputError

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from engine import hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def small_llama(**overrides):
    """llama-tiny's shape, smaller: GQA 4:2, odd-ish vocabulary."""
    torch.manual_seed(0)
    config = GPTConfig.from_preset("llama-tiny", **{**dict(vocab_size=97, block_size=64, n_layer=2, n_embd=64,
                                                            intermediate_size=96), **overrides})
    return GPT(config, backend="torch").eval()


# ---------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    (dict(arch="mamba"), "arch"),
    (dict(arch="llama", bias=False), "intermediate_size"),
    (dict(arch="llama", bias=True, intermediate_size=8), "bias"),
    (dict(arch="llama", bias=False, intermediate_size=8, n_kv_head=5), "n_kv_head"),
    (dict(arch="llama", bias=False, intermediate_size=8, n_kv_head=0), "n_kv_head"),
    (dict(arch="llama", bias=False, intermediate_size=8, head_dim=7), "head_dim"),
    (dict(arch="llama", bias=False, intermediate_size=8, rope_theta=-1.0), "rope_theta"),
    (dict(arch="llama", bias=False, intermediate_size=8, rope_scaling=dict(factor=8.0)), "rope_scaling"),
    (dict(arch="llama", bias=False, intermediate_size=8, qk_norm="yes"), "qk_norm"),
    (dict(n_kv_head=2), "n_kv_head"),  # GPT-2 has no GQA
    (dict(qk_norm=True), "qk_norm"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(InputError, match=message):
        GPTConfig(**{**dict(n_layer=1, n_head=4, n_embd=32), **fields})


def test_config_round_trips_and_old_gpt2_configs_still_load():
    for name in ("llama-tiny", "llama-3.2-1b", "qwen3-0.6b"):
        config = GPTConfig.from_preset(name)
        assert GPTConfig.from_dict(config.to_dict()) == config
    old = {k: v for k, v in GPTConfig.from_preset("tiny").to_dict().items() if k in
           ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "layer_norm_epsilon")}
    assert GPTConfig.from_dict(old) == GPTConfig.from_preset("tiny")  # a checkpoint from before the Llama fields
    with pytest.raises(InputError, match="missing fields"):
        GPTConfig.from_dict({k: v for k, v in old.items() if k != "n_head"})


# The published config.json of each model (the Hub's), as the Hugging Face config class reads it.
PUBLISHED = {
    "smollm2-135m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True), 134_515_008),
    "smollm2-360m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                         num_attention_heads=15, num_key_value_heads=5, tie_word_embeddings=True), 361_821_120),
    "llama-3.2-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                         tie_word_embeddings=True), 1_235_814_400),
    "qwen3-0.6b": ("Qwen3Config", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                       tie_word_embeddings=True), 596_049_920),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_full_size_presets_have_the_published_parameter_counts(name):
    config_class, published, known_count = PUBLISHED[name]
    """Counted on the meta device: no memory for a billion parameters. known_count is the number
    transformers gives for the published config (the models' cards round it: 135M, 360M, 1.24B, 0.6B)."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(name))
        theirs = getattr(transformers, config_class)(**published)
        theirs = sum(p.numel() for p in getattr(transformers, config_class.replace("Config", "ForCausalLM"))(theirs).parameters())
    assert all(p.is_meta for p in model.parameters())
    ours = model.num_params(non_embedding=False)
    assert ours == theirs == known_count
    assert model.lm_head.weight is model.transformer.wte.weight  # all four tie their head: counted once


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-360m", "llama-3.2-1b", "qwen3-0.6b"])
def test_full_size_preset_shapes_train_a_step(name):
    """Each full-size preset's layer shapes (n_layer and vocabulary overridden to fit a CPU test)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(name, n_layer=1, vocab_size=128, block_size=32), backend="torch")
    idx = torch.randint(0, 128, (1, 16))
    _, loss = model(idx, targets=idx.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(128.0)).item()) < 1.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Ops: the reference formulas against the torch backend (and independent formulas)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_and_add_rms_norm(dtype):
    ref, fast = get_backend("reference"), get_backend("torch")
    x, r, w = torch.randn(3, 5, 37, dtype=dtype), torch.randn(3, 5, 37, dtype=dtype), torch.randn(37, dtype=dtype)
    by_hand = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.rms_norm(x, w, 1e-5), by_hand, **tol)
    torch.testing.assert_close(fast.rms_norm(x, w, 1e-5), by_hand, **tol)
    (y_ref, s_ref), (y, s) = ref.add_rms_norm(x, r, w, 1e-5), fast.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, x + r) and torch.equal(s_ref, x + r)
    torch.testing.assert_close(y, y_ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_swiglu(dtype):
    gate, up = torch.randn(2, 7, 53, dtype=dtype), torch.randn(2, 7, 53, dtype=dtype)
    ref, fast = get_backend("reference").swiglu(gate, up), get_backend("torch").swiglu(gate, up)
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(ref, gate / (1 + torch.exp(-gate)) * up)


@pytest.mark.parametrize("h, hkv, sq, sk", [(4, 1, 7, 7), (6, 2, 5, 13), (8, 4, 1, 9), (3, 3, 11, 11)])
@pytest.mark.parametrize("kv_start", [None, torch.tensor([0, 3])])
def test_gqa_attention_equals_attention_with_repeated_heads(h, hkv, sq, sk, kv_start):
    q = torch.randn(2, h, sq, 16, dtype=torch.float64)
    k, v = torch.randn(2, hkv, sk, 16, dtype=torch.float64), torch.randn(2, hkv, sk, 16, dtype=torch.float64)
    repeated = reference.attention(q, k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1), kv_start=kv_start)
    for backend in ("reference", "torch"):
        out = get_backend(backend).attention(q, k, v, causal=True, kv_start=kv_start)
        torch.testing.assert_close(out, repeated, atol=1e-12, rtol=1e-12)


def test_rope_matches_hugging_face_and_llama3_scaling():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    hf_config = transformers.LlamaConfig(head_dim=32, num_attention_heads=2, hidden_size=64, max_position_embeddings=512,
                                         rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, **scaling))
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    cos, sin = reference.rope_tables(32, 512, 500000.0, scaling)
    angles = torch.arange(512).float()[:, None] * inv_freq[None]
    torch.testing.assert_close(cos, angles.cos(), atol=0, rtol=0)
    torch.testing.assert_close(sin, angles.sin(), atol=0, rtol=0)
    q, k = torch.randn(2, 4, 9, 32), torch.randn(2, 2, 9, 32)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 1, 2, 3, 4, 5]])  # row 1 left-padded by 3
    hf_cos, hf_sin = torch.cat([cos, cos], -1)[positions], torch.cat([sin, sin], -1)[positions]
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    for backend in ("reference", "torch", "triton"):  # triton: under the interpreter on the CPU
        ours_q, ours_k = get_backend(backend).apply_rope(q, k, cos, sin, positions)
        torch.testing.assert_close(ours_q, hf_q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours_k, hf_k, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_rope_at_kv_cache_offsets_equals_rope_of_the_full_sequence(backend):
    ops = get_backend(backend)
    cos, sin = reference.rope_tables(18, 40, 10000.0)
    dtype = torch.float32 if backend == "triton" else torch.float64  # the kernel takes fp32/fp16/bf16
    q, k = torch.randn(2, 3, 13, 18, dtype=dtype), torch.randn(2, 1, 13, 18, dtype=dtype)
    full_q, full_k = ops.apply_rope(q, k, cos, sin, torch.arange(13)[None])
    for start in (1, 6, 12):
        part_q, part_k = ops.apply_rope(q[:, :, start:], k[:, :, start:], cos, sin, torch.arange(start, 13)[None])
        torch.testing.assert_close(part_q, full_q[:, :, start:], atol=0, rtol=0)
        torch.testing.assert_close(part_k, full_k[:, :, start:], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, overrides, atol", [
    ("reference", dict(qk_norm=True, attn_bias=True, head_dim=24), 1e-5),
    # under the interpreter (conftest sets TRITON_INTERPRET=1): GQA with K/V read in place by the kernels
    ("triton", {}, 1e-4),
])
def test_backends_give_the_torch_backends_logits(backend, overrides, atol):
    model = small_llama(**overrides)
    idx = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        fast, _ = model(idx)
        other, _ = model.set_backend(backend)(idx)
    torch.testing.assert_close(other, fast, atol=atol, rtol=0)


def test_kv_cache_prefill_plus_decode_equals_full_forward():
    from engine.generate import KVCache

    model = small_llama()
    idx = torch.randint(0, 97, (2, 12))
    cache = KVCache(model.config, 2, 12, "cpu", torch.float32)
    assert cache.k.shape[2] == model.config.n_kv_head == 2  # the cache holds the key/value heads only
    with torch.no_grad():
        full, _ = model(idx)
        steps = [model(idx[:, :8], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_left_padding_does_not_change_a_rows_logits():
    model = small_llama()
    rows = [torch.randint(0, 97, (n,)) for n in (9, 5, 7)]
    padded = torch.stack([torch.cat([torch.zeros(9 - len(r), dtype=torch.long), r]) for r in rows])
    kv_start = torch.tensor([9 - len(r) for r in rows])
    with torch.no_grad():
        batch, _ = model(padded, kv_start=kv_start)
        for b, r in enumerate(rows):
            alone, _ = model(r[None])
            torch.testing.assert_close(batch[b, kv_start[b]:], alone[0], atol=1e-5, rtol=0)


def test_loss_mask_counts_only_masked_positions():
    model = small_llama()
    idx, targets = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10))
    mask = torch.zeros(2, 10)
    mask[:, 6:] = 1
    logits, loss = model(idx, targets=targets, loss_mask=mask)
    expected = torch.nn.functional.cross_entropy(logits[:, 6:].flatten(0, 1), targets[:, 6:].flatten())
    torch.testing.assert_close(loss, expected)


def test_untied_head_and_resize_vocab():
    model = small_llama(tie_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    head = model.lm_head.weight.detach().clone()
    model.resize_vocab(101)
    assert model.lm_head.weight.shape == (101, 64) and torch.equal(model.lm_head.weight[:97], head)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert small_llama().resize_vocab(101).lm_head.weight is not None


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_untied_checkpoint_round_trips_bitwise_with_two_tables(tmp_path):
    from safetensors.torch import load_file

    from engine.checkpoint import load_checkpoint, save_checkpoint
    from engine.tokenizer import Tokenizer

    model = perturbed(small_llama(tie_embeddings=False, vocab_size=300))
    tok = Tokenizer.train(["untied heads keep two tables"] * 5, vocab_size=300)
    folder = save_checkpoint(tmp_path, 1, model, tok, {"step": 1})
    in_file = load_file(folder / "model.safetensors")
    assert not torch.equal(in_file["lm_head.weight"], in_file["transformer.wte.weight"])  # both tables are written
    back, _, _, _ = load_checkpoint(folder, backend="torch")
    assert back.lm_head.weight is not back.transformer.wte.weight
    assert back.lm_head.weight.untyped_storage().data_ptr() != back.transformer.wte.weight.untyped_storage().data_ptr()
    a, b = model.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert back.num_params() == model.num_params() == perturbed(small_llama(vocab_size=300)).num_params() + 300 * 64
    # a tied model's checkpoint still comes back tied
    tied = perturbed(small_llama(vocab_size=300))
    back = load_checkpoint(save_checkpoint(tmp_path / "tied", 1, tied, tok, {"step": 1}), backend="torch")[0]
    assert back.lm_head.weight is back.transformer.wte.weight
    assert torch.equal(back.lm_head.weight, tied.lm_head.weight)


def test_head_and_token_table_must_agree_with_tie_embeddings(tmp_path):
    from safetensors.torch import load_file, save_file

    from engine.checkpoint import load_checkpoint, save_checkpoint
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.train(["tied or not"] * 5, vocab_size=300)
    untied = perturbed(small_llama(tie_embeddings=False, vocab_size=300))
    folder = save_checkpoint(tmp_path / "a", 1, untied, tok, {"step": 1})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_embeddings": True}))  # says tied, holds two tables
    with pytest.raises(InputError, match=rf"{folder / 'model.safetensors'}: lm_head.weight differs from transformer.wte.weight"):
        load_checkpoint(folder)
    folder = save_checkpoint(tmp_path / "b", 1, perturbed(small_llama(vocab_size=300)), tok, {"step": 1})
    (folder / "config.json").write_text(json.dumps({**config, "tie_embeddings": False}))  # says untied, holds one table
    weights = load_file(folder / "model.safetensors")
    table = weights.pop("lm_head.weight", None)  # safetensors keeps one of a tied table's two names
    save_file({"transformer.wte.weight": table, **weights}, folder / "model.safetensors")
    with pytest.raises(InputError, match=r"model.safetensors: .*tie_embeddings=False.*missing \['lm_head.weight'\]"):
        load_checkpoint(folder)


# ---------------------------------------------------------------------------------------------
# Hugging Face Llama, Qwen2, Qwen3
# ---------------------------------------------------------------------------------------------
HF_BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=96, tie_word_embeddings=True, rms_norm_eps=1e-5,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
HF_MODELS = {  # name -> (transformers class prefix, config fields beyond HF_BASE)
    "llama-3-rope": ("Llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0, original_max_position_embeddings=32))),
    "llama-mha-untied-head_dim": ("Llama", dict(num_key_value_heads=4, head_dim=8, tie_word_embeddings=False)),
    "qwen2": ("Qwen2", dict(rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "qwen3": ("Qwen3", dict(head_dim=32, num_key_value_heads=1)),
}


def hf_model(name, seed=0):
    """A random HF model with every parameter perturbed (norms and biases too), so a swapped or dropped tensor shows."""
    prefix, extra = HF_MODELS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(getattr(transformers, f"{prefix}Config")(**{**HF_BASE, **extra})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", HF_MODELS)
def test_from_hf_logits_match_with_and_without_left_padding(name):
    m = hf_model(name)
    ours = hf.from_hf(m, backend="torch").eval()
    g = torch.Generator().manual_seed(1)
    ids, kv_start = torch.randint(0, 101, (3, 13), generator=g), torch.tensor([4, 0, 1])
    mask = (torch.arange(13)[None] >= kv_start[:, None]).long()
    with torch.no_grad():
        assert (ours(ids)[0] - m(ids).logits).abs().max().item() < 1e-5
        theirs = m(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        padded, _ = ours(ids, kv_start=kv_start)
    assert (padded - theirs)[mask.bool()].abs().max().item() < 1e-5  # padding positions are don't-cares


@pytest.mark.parametrize("name", HF_MODELS)
def test_to_hf_round_trip_is_bitwise(name):
    m = hf_model(name)
    ours = hf.from_hf(m)
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == m.config.tie_word_embeddings
    back = hf.to_hf(ours)
    assert type(back) is type(m) and back.config.tie_word_embeddings == m.config.tie_word_embeddings
    a, b = m.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["llama-3-rope", "qwen3"])
def test_greedy_generation_matches_hf_generate(name):
    from engine.generate import decode_steps
    from engine.sampling import SamplingParams

    m = hf_model(name)
    ours = hf.from_hf(m, backend="torch")
    prompt = [5, 17, 3, 99, 42, 8]
    theirs = m.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, attention_mask=torch.ones(1, 6, dtype=torch.long))
    for _, loop in decode_steps(ours, [prompt], [SamplingParams(temperature=0.0, max_new_tokens=30)], sampler="reference"):
        pass
    assert loop.generated[0] == theirs[0, 6:].tolist()


def test_folder_in_export_out(tmp_path):
    m = hf_model("qwen2")
    m.save_pretrained(tmp_path / "hf")
    ours = hf.from_hf(tmp_path / "hf", backend="torch")
    assert ours.config.attn_bias and ours.config.rope_theta == 1000000.0
    hf.export(ours, None, tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, m(ids).logits)


def test_hf_folders_tied_or_not(tmp_path):
    """An untied folder loads with its own head; a tied config whose file holds a different head is
    refused, naming the file (it is not the model its config.json describes)."""
    from safetensors.torch import load_file, save_file

    m = hf_model("llama-mha-untied-head_dim")
    m.save_pretrained(tmp_path / "untied")
    ours = hf.from_hf(tmp_path / "untied", backend="torch")
    assert not ours.config.tie_embeddings and torch.equal(ours.lm_head.weight, m.lm_head.weight)
    assert not torch.equal(ours.lm_head.weight, ours.transformer.wte.weight)
    config = json.loads((tmp_path / "untied" / "config.json").read_text())
    (tmp_path / "untied" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(InputError, match=rf"{tmp_path / 'untied' / 'model.safetensors'}: lm_head.weight differs"):
        hf.from_hf(tmp_path / "untied")
    (tmp_path / "untied" / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "untied" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, tmp_path / "untied" / "model.safetensors")
    with pytest.raises(InputError, match=r"missing \['lm_head.weight'\]"):  # untied, but the head is not there
        hf.from_hf(tmp_path / "untied")


def test_hf_config_errors_name_the_field(tmp_path):
    good = hf_model("llama-3-rope").config.to_dict()
    for change, message in [(dict(hidden_act="gelu"), "hidden_act"), (dict(attention_bias=True), "attention_bias"),
                            (dict(rope_parameters=dict(rope_type="yarn", factor=4.0)), "rope_type"),
                            (dict(num_key_value_heads=3), "n_kv_head")]:
        with pytest.raises(InputError, match=message):
            hf.config_from_hf({**good, **change})
    with pytest.raises(InputError, match="lacks"):
        hf.config_from_hf({k: v for k, v in good.items() if k != "hidden_size"})


def logits_and_grads(model, ids, **kwargs):
    model.zero_grad()
    out = model(ids, labels=ids, **kwargs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["llama-3-rope", "qwen3"])
@pytest.mark.parametrize("backend", ["reference", "triton"])  # triton: under the interpreter (conftest)
def test_patch_runs_our_attention_and_rms_norm_inside_hf(name, backend, monkeypatch):
    calls = []
    ops_class = type(get_backend(backend))
    for op in ("attention", "rms_norm"):
        original = getattr(ops_class, op)
        monkeypatch.setattr(ops_class, op, lambda self, *a, _op=op, _f=original, **k: calls.append(_op) or _f(self, *a, **k))
    m = hf_model(name)
    ids, kv_start = torch.randint(0, 101, (2, 9)), torch.tensor([3, 0])
    mask = (torch.arange(9)[None] >= kv_start[:, None]).long()
    ref_logits, ref_grads = logits_and_grads(m, ids)
    with torch.no_grad():
        ref_padded = m(ids, attention_mask=mask).logits
    hf.patch(m, backend=backend)
    logits, grads = logits_and_grads(m, ids)
    n_norms = 2 * 2 + 1 + (2 * 2 if name == "qwen3" else 0)  # per block 2 (+ q_norm, k_norm), the final one
    assert calls.count("attention") == 2 and calls.count("rms_norm") == n_norms, calls
    assert (logits - ref_logits).abs().max().item() < 1e-4
    for n in ref_grads:
        assert (grads[n] - ref_grads[n]).abs().max().item() < 1e-4, n
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # left padding runs our attention, no fallback
        padded = m(ids, attention_mask=mask).logits
    assert (padded - ref_padded)[mask.bool()].abs().max().item() < 1e-4
    hf.unpatch(m)
    assert torch.equal(logits_and_grads(m, ids)[0], ref_logits)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_pretrain_llama_tiny_then_finetune_generate_chat_eval_export_and_profile(tmp_path):
    """Every command once with --preset llama-tiny (tiny step counts): a Llama's whole life."""
    from engine.checkpoint import load_checkpoint

    def run(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "engine", *args], input=stdin, capture_output=True, text=True,
                              timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    out = tmp_path / "run"
    result = run("pretrain", "--data", "builtin", "--n-people", "10", "--preset", "llama-tiny", "--out", str(out),
                 "--max-steps", "3", "--batch-size", "2", "--block-size", "64", "--vocab-size", "300",
                 "--eval-every", "3", "--eval-batches", "1", "--save-every", "3")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "step-0000003" / "config.json").read_text())["arch"] == "llama"
    result = run("finetune", "--init", str(out), "--data", "builtin", "--out", str(tmp_path / "ft"), "--max-steps", "2",
                 "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--save-every", "2")
    assert result.returncode == 0, result.stderr
    tuned, _, _, _ = load_checkpoint(tmp_path / "ft", backend="torch")
    assert tuned.config == load_checkpoint(out, backend="torch")[0].config  # still llama-tiny (at --block-size 64)
    ids = torch.randint(0, tuned.config.vocab_size, (2, 17))
    with torch.no_grad():  # trained under torch, run under the others (triton: the interpreter, conftest)
        want = tuned.eval()(ids)[0]
        for backend in ("reference", "triton"):
            got = load_checkpoint(tmp_path / "ft", backend=backend)[0].eval()(ids)[0]
            assert (got - want).abs().max().item() < 1e-4, backend
    assert json.loads((tmp_path / "ft" / "step-0000002" / "run.json").read_text())["preset"] == "llama-tiny"
    result = run("generate", "--ckpt", str(out), "--prompt", "Alice was born", "--max-new-tokens", "5", "--seed", "1")
    assert result.returncode == 0 and result.stdout.startswith("Alice was born"), result.stderr
    result = run("chat", "--ckpt", str(tmp_path / "ft"), "--max-new-tokens", "5", "--seed", "1", stdin="hello\nwho are you?\n")
    assert result.returncode == 0 and result.stdout.count("assistant> ") == 2, result.stderr
    result = run("profile", "--preset", "llama-tiny", "--mode", "train", "--steps", "1", "--batch-size", "1", "--seq-len", "32",
                 "--out", str(tmp_path / "prof"))
    assert result.returncode == 0 and (tmp_path / "prof" / "trace.json").is_file(), result.stderr
    assert "rms_norm" in (tmp_path / "prof" / "trace.json").read_text()  # the Llama ops ran
    result = run("eval", "--ckpt", str(out))
    assert result.returncode == 0 and "qa_accuracy_held_out_half" in result.stdout, result.stderr
    result = run("export", "--ckpt", str(out), "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_checkpoint(out, backend="torch")[0].eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert type(exported).__name__ == "LlamaForCausalLM"
        assert (exported(ids).logits - ours(ids)[0]).abs().max().item() < 1e-5
