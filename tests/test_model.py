"""The GPT model: backends agree, the loss is what it says, configs and helpers are right."""
import pytest
import torch
import torch.nn.functional as F

from engine import GPT, GPTConfig
from engine.generate import KVCache

SMALL = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)


def random_model(config=SMALL, backend="reference"):
    model = GPT(config, backend=backend)
    with torch.no_grad():  # move LayerNorm gains/biases off 1/0 so their use is tested too
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("bias", [True, False])
def test_reference_and_torch_backends_give_the_same_logits(bias):
    model = random_model(GPTConfig(**{**SMALL.to_dict(), "bias": bias}))
    idx = torch.randint(0, 97, (3, 37))
    ref, _ = model(idx)
    model.set_backend("torch")
    fast, _ = model(idx)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def test_fused_residual_equals_nanogpt_style_blocks():
    """The blocks' fused add + LayerNorm computes x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)),
    written here with the modules called directly, as nanoGPT's model does."""
    model = random_model()
    idx = torch.randint(0, 97, (2, 23))
    t = model.transformer
    x = t.wte(idx) + t.wpe(torch.arange(23))
    ops = model.ops_for(idx.device)
    for block in t.h:
        x = x + block.attn(block.ln_1(x), ops)
        x = x + block.mlp(block.ln_2(x))
    torch.testing.assert_close(model(idx)[0], model.lm_head(t.ln_f(x)), atol=1e-5, rtol=0)


def test_loss_is_cross_entropy_of_the_logits():
    model = random_model()
    idx, targets = torch.randint(0, 97, (2, 2, 20))
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_loss_mask_excludes_what_it_should():
    model = random_model()
    idx, targets = torch.randint(0, 97, (2, 2, 20))
    mask = torch.zeros(2, 20, dtype=torch.long)
    mask[0, 5:9] = 1
    mask[1, 12] = 1
    logits, loss = model(idx, targets, loss_mask=mask)
    counted = mask.bool()
    expected = F.cross_entropy(logits[counted], targets[counted])
    torch.testing.assert_close(loss, expected)
    # changing a target outside the mask changes nothing
    targets2 = targets.clone()
    targets2[0, 0] = (targets2[0, 0] + 1) % 97
    torch.testing.assert_close(model(idx, targets2, loss_mask=mask)[1], loss)
    # ignore_index -1 also excludes
    targets3 = targets.clone()
    targets3[0, 5] = -1
    expected3 = F.cross_entropy(logits[counted], targets3[counted], ignore_index=-1)
    torch.testing.assert_close(model(idx, targets3, loss_mask=mask)[1], expected3)


def test_kv_cache_prefill_plus_decode_equals_full_forward():
    model = random_model(backend="torch")
    idx = torch.randint(0, 97, (2, 30))
    full, _ = model(idx)
    cache = KVCache(SMALL, 2, 30, "cpu", torch.float32)
    first, _ = model(idx[:, :20], cache=cache)
    steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(20, 30)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=0)


def test_left_padding_does_not_change_a_rows_logits():
    model = random_model(backend="torch")
    seq = torch.randint(0, 97, (1, 12))
    alone, _ = model(seq)
    padded = torch.cat([torch.randint(0, 97, (1, 5)), seq], dim=1)
    logits, _ = model(padded, kv_start=torch.tensor([5]))
    torch.testing.assert_close(logits[:, 5:], alone, atol=1e-5, rtol=0)


def test_state_dict_keys_do_not_depend_on_the_backend():
    model = random_model()
    keys = list(model.state_dict())
    model.set_backend("torch")
    assert list(model.state_dict()) == keys
    assert "lm_head.weight" in keys and "transformer.h.1.attn.c_attn.weight" in keys


def test_unknown_backend_and_overlong_input_raise_clearly():
    with pytest.raises(ValueError, match="backend must be one of"):
        GPT(SMALL, backend="cuda-magic")
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        random_model()(torch.zeros(1, 65, dtype=torch.long))


def test_presets_and_parameter_counts():
    gpt2 = GPT(GPTConfig.from_preset("gpt2"))
    assert (gpt2.config.n_layer, gpt2.config.n_head, gpt2.config.n_embd, gpt2.config.block_size, gpt2.config.vocab_size) == (12, 12, 768, 1024, 50257)
    assert gpt2.num_params(non_embedding=False) == 124_439_808  # GPT-2 small, tied head counted once
    assert gpt2.num_params() == 124_439_808 - 1024 * 768
    n, L, C, T = gpt2.num_params(), 12, 768, 1024
    assert gpt2.flops_per_token(T) == 6 * n + 12 * L * C * T
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=100, n_head=3)


def test_init_follows_gpt2():
    model = GPT(GPTConfig(vocab_size=1000, block_size=64, n_layer=8, n_head=4, n_embd=256))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.002
    proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(proj - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * n_layer)
    assert model.transformer.h[0].mlp.c_fc.bias.abs().max() == 0


def test_decode_layout_keeps_values_state_dict_and_training(tmp_path):
    """decode_layout (called by generation on the CPU) changes only strides: same logits, the same
    state_dict and checkpoint bytes' values, and the model still trains, with gradients equal to
    those of the standard layout, laid out like their weights."""
    from engine.checkpoint import model_from_weights, read_safetensors, write_weights

    model = random_model(backend="torch")
    twin = random_model(backend="torch")
    twin.load_state_dict(model.state_dict())
    idx, targets = torch.randint(0, 97, (2, 19)), torch.randint(0, 97, (2, 19))
    with torch.inference_mode():  # as decode_steps calls it
        twin.decode_layout()
    linears = [m for m in twin.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    assert twin.lm_head.weight is twin.transformer.wte.weight  # still tied
    torch.testing.assert_close(twin(idx)[0], model(idx)[0], atol=1e-6, rtol=0)
    write_weights(twin, tmp_path / "m.safetensors")
    loaded = model_from_weights(SMALL, read_safetensors(tmp_path / "m.safetensors"), "m.safetensors", "torch")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    for m in (model, twin):
        m.train()
        m(idx, targets)[1].backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=0, msg=name)
        assert q.grad.stride() == q.stride(), name


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hooks_and_replaced_linears_still_run(arch):
    """Hooks on a layer or global, and a module put in a Linear's place, run: the model calls its
    Linears as modules (a decode step is bound by dispatch, and skipping nn.Module's call is a
    tempting shortcut that would lose them)."""
    torch.manual_seed(0)
    preset = "tiny" if arch == "gpt2" else "llama-tiny"
    model = GPT(GPTConfig.from_preset(preset, vocab_size=64, block_size=16, n_layer=2), backend="torch")
    idx = torch.randint(0, 64, (2, 5))
    seen = []
    block = model.transformer.h[1]
    handles = [block.attn.c_attn.register_forward_hook(lambda m, a, o: seen.append("c_attn forward")),
               block.mlp.c_proj.register_forward_pre_hook(lambda m, a: seen.append("mlp.c_proj pre")),
               model.lm_head.register_full_backward_hook(lambda m, gi, go: seen.append("lm_head backward"))]
    model(idx, targets=idx)[1].backward()
    assert seen == ["c_attn forward", "mlp.c_proj pre", "lm_head backward"]
    for h in handles:
        h.remove()
    seen.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: seen.append(type(m).__name__) if isinstance(m, torch.nn.Linear) else None)
    try:
        with torch.no_grad():
            model(idx)
    finally:
        handle.remove()
    assert seen.count("Linear") == 2 * 4 + 1  # four a block and the head

    class Doubled(torch.nn.Linear):  # an adapter in a Linear's place: its forward must be the one that runs
        def forward(self, x):
            return 2 * super().forward(x)

    with torch.no_grad():
        before = model(idx)[0]
        old = block.mlp.c_proj
        block.mlp.c_proj = Doubled(old.in_features, old.out_features, bias=old.bias is not None)
        block.mlp.c_proj.load_state_dict(old.state_dict())
        assert not torch.allclose(model(idx)[0], before)
        block.mlp.c_proj = old
        torch.testing.assert_close(model(idx)[0], before)
