"""engine.hf against Hugging Face transformers, on randomly initialised GPT-2s (nothing downloaded).

The Triton patch test runs in a subprocess: TRITON_INTERPRET=1 must be set before triton is
imported, and this process may already have imported it without.
"""
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel  # noqa: E402

from engine import hf  # noqa: E402
from engine.backends import ReferenceBackend  # noqa: E402
from engine.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "2x32": dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=2),
    "3x64-tanh-eps": dict(vocab_size=211, n_positions=48, n_embd=64, n_layer=3, n_head=4,
                          layer_norm_epsilon=1e-6, activation_function="gelu_pytorch_tanh"),
    "1x16": dict(vocab_size=50, n_positions=40, n_embd=16, n_layer=1, n_head=1),
}


def hf_gpt2(seed=0, **config):
    """A random GPT2LMHeadModel with every parameter perturbed (LayerNorms and biases too), so a
    swapped, untransposed or dropped tensor shows in the logits."""
    torch.manual_seed(seed)
    cfg = GPT2Config(**{**CONFIGS["2x32"], **config}, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def left_padded(batch=3, length=11, vocab=97, pads=(4, 0, 1), seed=1):
    """(ids, attention_mask, HF position_ids, our kv_start) for a batch of left-padded rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    kv_start = torch.tensor(pads)
    mask = (torch.arange(length)[None] >= kv_start[:, None]).long()
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), kv_start


# ---------------------------------------------------------------------------------------------
# Weights in and out
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_from_hf_logits_match(name):
    m = hf_gpt2(**CONFIGS[name])
    gpt = hf.from_hf(m, backend="torch").eval()
    vocab = CONFIGS[name]["vocab_size"]
    ids, mask, pos, kv_start = left_padded(vocab=vocab)
    with torch.no_grad():
        ref = m(ids).logits
        ours, _ = gpt(ids)
        assert (ours - ref).abs().max().item() < 1e-5
        ref = m(ids, attention_mask=mask, position_ids=pos).logits
        ours, _ = gpt(ids, kv_start=kv_start)
    real = mask.bool()  # the padding positions' outputs are don't-cares in both models
    assert (ours - ref)[real].abs().max().item() < 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_to_hf_round_trip_state_dict_identical(name):
    m = hf_gpt2(**CONFIGS[name])
    back = hf.to_hf(hf.from_hf(m))
    a, b = m.state_dict(), back.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert back.lm_head.weight is back.transformer.wte.weight  # still tied


@pytest.mark.parametrize("save", ["safetensors", "bin", "sharded"])
def test_from_hf_folder(tmp_path, save):
    m = hf_gpt2(**CONFIGS["3x64-tanh-eps"])
    if save == "bin":  # as old GPT-2 repos hold it: no "transformer." prefix, causal-mask buffers saved
        m.config.save_pretrained(tmp_path)
        state = {k.removeprefix("transformer."): v for k, v in m.state_dict().items() if k != "lm_head.weight"}
        state |= {f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64).tril() for i in range(m.config.n_layer)}
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        m.save_pretrained(tmp_path, **({"max_shard_size": "100KB"} if save == "sharded" else {}))
    expected = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin", "sharded": "model.safetensors.index.json"}
    assert (tmp_path / expected[save]).is_file()  # the format under test is the one written
    gpt, tokenizer = hf.load_hf(tmp_path, backend="torch")
    assert tokenizer is None  # no tokenizer.json in the folder
    ids = torch.randint(0, 211, (2, 9))
    with torch.no_grad():
        assert (gpt.eval()(ids)[0] - m(ids).logits).abs().max().item() < 1e-5


def test_folder_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        hf.from_hf(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        hf.from_hf(tmp_path / "nowhere")
    m = hf_gpt2()
    m.save_pretrained(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    cases = {
        "model_type is 'bert'": dict(model_type="bert"),  # Llama, Qwen2, Qwen3 load since issue 16
        "no model_type": dict(model_type=None),  # e.g. our own checkpoint's config.json
        "activation_function": dict(activation_function="relu"),
        "n_inner": dict(n_inner=100),
        "scale_attn_by_inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
        "reorder_and_upcast_attn": dict(reorder_and_upcast_attn=True),
        "tie_word_embeddings": dict(tie_word_embeddings=False),
        r"missing \['transformer.h.2": dict(n_layer=3),  # the config promises more blocks than the weights hold
    }
    for message, change in cases.items():
        folder = tmp_path / message.replace("\\", "")[:20]
        folder.mkdir()
        changed = {k: v for k, v in {**config, **change}.items() if v is not None}
        (folder / "config.json").write_text(json.dumps(changed))
        (folder / "model.safetensors").symlink_to(tmp_path / "ok" / "model.safetensors")
        with pytest.raises(InputError, match=message):
            hf.from_hf(folder)
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="pytorch_model.bin"):
        hf.from_hf(tmp_path / "no_weights")


def test_export_loads_with_from_pretrained(tmp_path):
    from transformers import AutoTokenizer

    from engine.tokenizer import Tokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "Ada was born in Paris in 1990."] * 20
    tokenizer = Tokenizer.train(texts, vocab_size=300)
    gpt = hf.from_hf(hf_gpt2(vocab_size=300)).eval()
    out = hf.export(gpt, tokenizer, tmp_path / "exported")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, GPT2LMHeadModel)
    ids = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        assert (loaded(ids).logits - gpt(ids)[0]).abs().max().item() < 1e-5
    text = "the lazy fox was born in 1990"
    assert AutoTokenizer.from_pretrained(out).encode(text) == tokenizer.encode(text)
    assert loaded.generation_config.eos_token_id == [tokenizer.end_id, tokenizer.bos_id]  # stops at a turn's end
    again, again_tok = hf.load_hf(out)
    assert again_tok.encode(text) == tokenizer.encode(text)
    with pytest.raises(InputError, match="exists"):
        hf.export(gpt, None, out)  # never writes over a folder


def test_greedy_generation_matches_hf_generate():
    from engine.generate import generate
    from engine.sampling import SamplingParams
    from engine.tokenizer import Tokenizer

    m = hf_gpt2(vocab_size=300)
    gpt = hf.from_hf(m).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 300, (n,), generator=g) for n in (8, 5)]
    expected = [m.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=30,
                           do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    # engine.generate: both prompts in one batch (the shorter one left-padded), prefill + KV-cache decode
    tokenizer = Tokenizer.train(["only needed to decode the text"], vocab_size=300)
    done = generate(gpt, tokenizer, [p.tolist() for p in prompts], SamplingParams(temperature=0.0, max_new_tokens=30),
                    sampler="reference")
    assert [c.token_ids for c in done] == expected
    idx = prompts[0][None]
    with torch.no_grad():
        for _ in range(30):  # and a plain greedy loop, full recompute each step
            logits, _ = gpt(idx)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert idx[0, 8:].tolist() == expected[0]


def test_finetune_hf_model_then_export_back():
    m = hf_gpt2(**CONFIGS["2x32"])
    gpt = hf.from_hf(m).train()
    batch = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        _, loss = gpt(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5  # it learns (memorises the batch)
    with torch.no_grad():
        assert (hf.to_hf(gpt)(batch).logits - gpt.eval()(batch)[0]).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------
# patch: our ops inside a Hugging Face model
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def spy(monkeypatch):
    """Record every attention / layer_norm call the reference backend gets (kv_start included)."""
    calls = {"attention": [], "layer_norm": 0}
    attention, layer_norm = ReferenceBackend.attention, ReferenceBackend.layer_norm

    def spy_attention(self, q, k, v, causal=True, kv_start=None):
        calls["attention"].append((causal, kv_start))
        return attention(self, q, k, v, causal=causal, kv_start=kv_start)

    def spy_layer_norm(self, *args):
        calls["layer_norm"] += 1
        return layer_norm(self, *args)

    monkeypatch.setattr(ReferenceBackend, "attention", spy_attention)
    monkeypatch.setattr(ReferenceBackend, "layer_norm", spy_layer_norm)
    return calls


def logits_and_grads(model, ids, **kwargs):
    model.zero_grad()
    out = model(ids, labels=ids, **kwargs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_patch_reference_logits_and_grads(spy):
    m = hf_gpt2(**CONFIGS["3x64-tanh-eps"])
    ids = torch.randint(0, 211, (2, 12))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ref_logits, ref_grads = logits_and_grads(m, ids)
    hf.patch(m, backend="reference")
    logits, grads = logits_and_grads(m, ids)
    assert len(spy["attention"]) == 3 and spy["layer_norm"] == 3 * 2 + 1  # every block's ops are ours
    assert (logits - ref_logits).abs().max().item() < 1e-5
    for n in ref_grads:
        assert (grads[n] - ref_grads[n]).abs().max().item() < 1e-4, n
    assert m.state_dict().keys() == state.keys() and all(torch.equal(m.state_dict()[k], state[k]) for k in state)
    hf.unpatch(m)
    assert m.config._attn_implementation == "sdpa"
    assert all("forward" not in mod.__dict__ for mod in m.modules())
    n_calls = len(spy["attention"])
    assert torch.equal(logits_and_grads(m, ids)[0], ref_logits)
    assert len(spy["attention"]) == n_calls  # unpatched: ours no longer runs
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch(m)


def test_patch_left_padding_runs_our_kernel_with_kv_start(spy):
    m = hf_gpt2()
    ids, mask, pos, kv_start = left_padded()
    with torch.no_grad():
        ref = m(ids, attention_mask=mask, position_ids=pos).logits
        hf.patch(m, backend="reference")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # left padding must not fall back
            out = m(ids, attention_mask=mask, position_ids=pos).logits
    assert all(torch.equal(ks, kv_start) for _, ks in spy["attention"]) and spy["attention"]
    assert (out - ref)[mask.bool()].abs().max().item() < 1e-5


def test_patch_other_masks_fall_back_to_sdpa_with_a_warning(spy):
    m = hf_gpt2()
    ids, mask, _, _ = left_padded(pads=(0, 0, 0))
    mask[1, -3:] = 0  # right padding: not expressible as kv_start
    with torch.no_grad():
        ref = m(ids, attention_mask=mask).logits
        hf.patch(m, backend="reference")
        with pytest.warns(UserWarning, match="SDPA"):
            out = m(ids, attention_mask=mask).logits
    assert spy["attention"] == []  # nothing ran on our kernel
    assert (out - ref)[mask.bool()].abs().max().item() < 1e-5


def test_patched_generate_matches_unpatched_with_left_padding():
    m = hf_gpt2()
    ids, mask, _, _ = left_padded(length=7, pads=(3, 0, 1))
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = m.generate(ids, **kwargs)
    hf.patch(m, backend="reference")
    assert torch.equal(m.generate(ids, **kwargs), expected)  # prefill with padding, then KV-cache decode


def test_attention_plan_reads_hf_masks():
    from engine.reference import attention_mask

    kv_start = torch.tensor([2, 0])
    bool_mask = attention_mask(5, 5, True, kv_start)  # [2, 1, 5, 5]
    neg = torch.finfo(torch.float32).min
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~bool_mask, neg)  # older transformers' eager-style mask
    for mask in (bool_mask, additive):
        causal, ks, keys = hf.attention_plan(mask, 5, 5)
        assert causal and torch.equal(ks, kv_start) and keys == 5
    assert hf.attention_plan(attention_mask(5, 5, True), 5, 5)[:2] == (True, None)
    assert hf.attention_plan(torch.ones(1, 1, 1, 6, dtype=torch.bool), 1, 6)[:2] == (False, None)
    padded = torch.cat([additive, torch.full((2, 1, 5, 1), neg)], dim=-1)  # transformers 4.x: one key too many
    assert hf.attention_plan(padded, 5, 5)[1].tolist() == [2, 0]
    assert hf.attention_plan(None, 1, 6) == (False, None, 6)  # decode: one query sees every key
    assert hf.attention_plan(None, 4, 9) == (True, None, 4)  # static-cache prefill: top-left
    holes = bool_mask.clone()
    holes[1, 0, 4, 1] = False
    assert hf.attention_plan(holes, 5, 5) is None
    assert hf.attention_plan(additive + 0.5 * (additive == 0), 5, 5) is None  # a bias, not a mask
    per_head = bool_mask.expand(2, 3, 5, 5).clone()
    per_head[0, 1, 4, 3] = False
    assert hf.attention_plan(per_head, 5, 5) is None


def test_patch_refuses_what_it_cannot_run(monkeypatch):
    m = hf_gpt2()
    m.config.model_type = "llama"
    with pytest.raises(InputError, match="GPT-2"):
        hf.patch(m, backend="reference")
    for unsupported in ("add_cross_attention", "scale_attn_by_inverse_layer_idx"):
        with pytest.raises(InputError, match=unsupported):
            hf.patch(hf_gpt2(**{unsupported: True}), backend="reference")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(InputError, match="CUDA"):
            hf.patch(hf_gpt2(), backend="triton")


TRITON_SCRIPT = textwrap.dedent("""
    import json, torch, kernels
    missing = [f for f in ("flash_attention", "layer_norm") if not hasattr(kernels, f)]
    if missing:
        print(json.dumps({"skip": f"kernels has no {missing} yet"})); raise SystemExit
    import warnings
    from tests.test_hf import hf_gpt2, left_padded, logits_and_grads
    from engine import hf
    warnings.simplefilter("error")  # a fallback to SDPA would warn
    # Triton 3.6's interpreter (make test-compat) converts 1-element arrays to scalars, which
    # NumPy 2.3 warns about: the interpreter's habit, not our fallback
    warnings.filterwarnings("ignore", "Conversion of an array with ndim > 0", DeprecationWarning)
    calls = {"flash_attention": 0, "layer_norm": 0}
    for name in calls:  # count the kernel launches (the backend looks them up on each call)
        def counted(*args, _f=getattr(kernels, name), _name=name, **kwargs):
            calls[_name] += 1
            return _f(*args, **kwargs)
        setattr(kernels, name, counted)
    m = hf_gpt2()
    ids, mask, pos, _ = left_padded(length=9)
    ref_logits, ref_grads = logits_and_grads(m, ids)
    with torch.no_grad():
        ref_pad = m(ids, attention_mask=mask, position_ids=pos).logits
    hf.patch(m, backend="triton")
    logits, grads = logits_and_grads(m, ids)
    with torch.no_grad():
        pad = m(ids, attention_mask=mask, position_ids=pos).logits
    print(json.dumps({
        "logits": (logits - ref_logits).abs().max().item(),
        "grads": max((grads[n] - ref_grads[n]).abs().max().item() for n in grads),
        "padded": (pad - ref_pad)[mask.bool()].abs().max().item(),
        "calls": calls,
    }))
""")


@pytest.mark.slow
def test_patch_triton_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["logits"] < 1e-5 and result["padded"] < 1e-5, result
    assert result["grads"] < 1e-4, result
    assert result["calls"] == {"flash_attention": 2 * 2, "layer_norm": 2 * 5}, result  # 2 forwards x (2 blocks, 5 LNs)


# ---------------------------------------------------------------------------------------------
# The command line: finetune --hf, export
# ---------------------------------------------------------------------------------------------
def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cli_finetune_from_hf_folder(tmp_path):
    from engine.tokenizer import Tokenizer

    convo = {"messages": [{"role": "user", "content": "Where was Ada born?"},
                          {"role": "assistant", "content": "Ada was born in Paris."}]}
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(convo) for _ in range(8)) + "\n")
    tokenizer = Tokenizer.train([convo["messages"][0]["content"], convo["messages"][1]["content"]] * 10, vocab_size=300)
    hf.export(hf.from_hf(hf_gpt2(vocab_size=300)), tokenizer, tmp_path / "hf")
    run = cli("finetune", "--hf", str(tmp_path / "hf"), "--data", str(data), "--max-steps", "2",
              "--batch-size", "2", "--out", str(tmp_path / "out"), "--device", "cpu")
    assert run.returncode == 0, run.stderr[-3000:]
    assert any((tmp_path / "out").glob("step-*"))  # it saved a fine-tuned checkpoint


@pytest.mark.slow
def test_cli_export(tmp_path):
    from engine.checkpoint import save_checkpoint
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["hello world, hello there"] * 10, vocab_size=300)
    gpt = hf.from_hf(hf_gpt2(vocab_size=300)).eval()
    ckpt = save_checkpoint(tmp_path / "run", 0, gpt, tokenizer, {"step": 0})
    run = cli("export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"))
    assert run.returncode == 0, run.stderr[-3000:]
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert (loaded(ids).logits - gpt(ids)[0]).abs().max().item() < 1e-5


def test_fine_tuning_a_gpt2_tokenizer_adds_the_chat_tokens_and_rows(tmp_path):
    """GPT-2's tokenizer has only <|endoftext|>: fine-tuning appends the chat tokens and grows
    the tied embedding by as many rows, leaving every old row as it was."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from engine.tokenizer import Tokenizer
    from engine.jobs import finetune, load_init
    from engine.train import TrainConfig

    texts = ["Where was Ada born? Ada was born in Paris."] * 20
    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    plain = Tokenizer(raw)
    assert not plain.has_chat_tokens
    gpt = hf.from_hf(hf_gpt2(vocab_size=plain.vocab_size))
    hf.export(gpt, plain, tmp_path / "hf")

    model, tokenizer, _ = load_init(hf=tmp_path / "hf", device="cpu", backend="torch")
    assert tokenizer.has_chat_tokens
    assert model.config.vocab_size == tokenizer.vocab_size == plain.vocab_size + 4
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight[: plain.vocab_size], gpt.transformer.wte.weight)

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Where was Ada born?"},
                                             {"role": "assistant", "content": "Ada was born in Paris."}]}) + "\n")
    cfg = TrainConfig(max_steps=2, batch_size=2, eval_every=2, eval_batches=1, save_every=2)
    metrics = finetune(None, str(data), tmp_path / "out", cfg, backend="torch", device="cpu", progress=False, hf=tmp_path / "hf")
    assert metrics["step"] == 2
