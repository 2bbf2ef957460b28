"""The triton backend end to end: training and generation through our kernels equal the
reference backend's. On the CPU the kernels run under TRITON_INTERPRET=1 (fp32); on CUDA the
same checks run in bf16 (marked `cuda`)."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from engine import GPT, GPTConfig
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.generate import decode_steps
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from engine.train import TrainConfig, make_optimizer

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

# 2 layers, context 64: head dim 16 (32 wide, 2 heads) and head dim 32 (128 wide, 4 heads)
CONFIGS = [GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32),
           GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=128)]


def twin_models(config, device="cpu"):
    ref = GPT(config, backend="reference").to(device)
    tri = copy.deepcopy(ref).set_backend("triton")
    return ref, tri


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def train_steps(model, batches, steps=5):
    """Per-step losses of AdamW steps, and the gradients of step 0."""
    opt = make_optimizer(model, TrainConfig(max_steps=steps, lr=1e-3))
    losses, grads0 = [], None
    for x, y in batches[:steps]:
        _, loss = model(x, y)
        loss.backward()
        if grads0 is None:
            grads0 = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads0


@pytest.mark.parametrize("config", CONFIGS, ids=["hd16", "hd32"])
def test_five_adamw_steps_match_the_reference(config):
    ref, tri = twin_models(config)
    batches = [tuple(torch.randint(0, 97, (2, 2, 64))) for _ in range(5)]
    ref_losses, ref_grads = train_steps(ref, batches)
    tri_losses, tri_grads = train_steps(tri, batches)
    for step, (a, b) in enumerate(zip(tri_losses, ref_losses)):
        assert abs(a - b) / abs(b) < 1e-4, f"step {step}: triton {a} vs reference {b}"
    worst = max((rel_err(tri_grads[n], ref_grads[n]), n) for n in ref_grads)
    assert worst[0] < 1e-4, f"gradient of {worst[1]} differs by {worst[0]:.2e} (relative)"


def test_greedy_generation_matches_the_reference():
    ref, tri = twin_models(CONFIGS[1])
    prompts = [[5, 9, 11], [7] * 13, [3, 1, 4, 1, 5, 9, 2]]  # different lengths: left padding on the kernel path
    params = [SamplingParams(temperature=0.0, max_new_tokens=20)] * 3
    outputs = {}
    for name, model in (("reference", ref), ("triton", tri)):
        for _, loop in decode_steps(model.eval(), prompts, params):
            pass
        outputs[name] = loop.generated
    assert outputs["triton"] == outputs["reference"]


def test_a_reference_checkpoint_runs_under_triton(tmp_path):
    ref, _ = twin_models(CONFIGS[0])
    tok = Tokenizer.train(["some text to make a tokenizer from"] * 3, vocab_size=300)
    ref.resize_vocab(tok.vocab_size)  # a checkpoint's tokenizer must fit its model, or it does not load
    folder = save_checkpoint(tmp_path, 1, ref, tok, {"step": 1})
    loaded, _, _, _ = load_checkpoint(folder, backend="triton")
    assert list(loaded.state_dict()) == list(ref.state_dict())
    idx = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(idx)[0], ref.eval()(idx)[0], atol=1e-5, rtol=0)


def test_triton_without_gpu_or_interpreter_explains_itself(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "engine", "pretrain", "--data", "builtin", "--out", str(tmp_path),
                             "--max-steps", "1", "--backend", "triton", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "'torch'" in result.stderr and "TRITON_INTERPRET=1" in result.stderr


# bf16 on a GPU: the kernels and the reference both take bf16 inputs, but the reference does its
# math in fp32 while the kernels round P to bf16 before P·V (as FlashAttention does), so errors
# of a few bf16 ulps (2^-8 = 0.4% relative) per op are expected; over 2 layers and 5 AdamW steps
# we allow 2% on the loss and 5% (relative to the largest entry) on step-0 gradients.
@pytest.mark.cuda
@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU")
def test_bf16_training_and_generation_on_cuda():
    ref, tri = twin_models(CONFIGS[1], device="cuda")
    batches = [tuple(torch.randint(0, 97, (2, 4, 64), device="cuda")) for _ in range(5)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref_losses, ref_grads = train_steps(ref, batches)
        tri_losses, tri_grads = train_steps(tri, batches)
    for a, b in zip(tri_losses, ref_losses):
        assert abs(a - b) / abs(b) < 2e-2
    for n in ref_grads:
        assert rel_err(tri_grads[n], ref_grads[n]) < 5e-2, n
    prompts = [[5, 9, 11], [7] * 13]
    params = [SamplingParams(temperature=0.0, max_new_tokens=20)] * 2
    for _, loop in decode_steps(tri.eval(), prompts, params):
        pass
    assert all(len(g) == 20 for g in loop.generated)
