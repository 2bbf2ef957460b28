"""The kernels as torch.library custom ops (torch.ops.llm_engine.*), and the model under torch.compile.

On the CPU, where the kernels run under TRITON_INTERPRET=1 in fp32: torch.library.opcheck (schema,
fake implementation, autograd registration, AOT dispatch with dynamic shapes) passes for every op,
optional arguments given and not; torch._dynamo.explain finds no graph break in a training step
(forward and backward) or a decode step (KV cache, left padding) of a tiny GPT-2 and Llama under each
backend; torch.compile(model, fullgraph=True, backend="aot_eager") gives the eager logits, loss and
gradients. On CUDA (marked `cuda`): inductor compiles the same, equal within bf16 tolerance.
"""
import copy
import os

import pytest
import torch
import torch._dynamo

import kernels  # also registers the ops
from engine import GPT, GPTConfig, reference
from engine.devices import autocast_for, kv_cache_dtype
from engine.generate import KVCache

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

ops = torch.ops.llm_engine


def leaf(*shape, device="cpu"):
    return torch.randn(*shape, device=device, requires_grad=True)


def attention_case(b, h, hkv, sq, sk, padded, deterministic):
    """flash_attention's arguments: head dim 16; padded: kv_start left-pads row 0 by 3 keys."""
    kv_start = torch.tensor([3, 0][:b]) if padded else None
    return leaf(b, h, sq, 16), leaf(b, hkv, sk, 16), leaf(b, hkv, sk, 16), True, 0.25, kv_start, None, deterministic


def static_cache_attention_case():
    """A decode step over a whole preallocated cache of 70 keys, rows holding 9 and 66 (kv_lens),
    row 0 left-padded: inference only, so no gradients."""
    q, k, v, causal, scale, kv_start, _, deterministic = attention_case(2, 4, 2, 1, 70, True, True)
    return q.detach(), k.detach(), v.detach(), causal, scale, kv_start, torch.tensor([9, 66]), deterministic


def attention_backward_case():
    """flash_attention_backward's arguments from a forward (GQA, padded, deterministic)."""
    q, k, v, causal, scale, kv_start, kv_lens, deterministic = attention_case(2, 4, 2, 5, 9, True, True)
    o, lse = ops.flash_attention(q, k, v, causal, scale, kv_start, kv_lens, deterministic)
    return torch.randn_like(o), *(t.detach() for t in (q, k, v, o, lse)), causal, scale, kv_start, deterministic


def norm_backward_case():
    """norm_backward's arguments from an add_rms_norm forward over [3, 5, 40] (no bias, no mean)."""
    x, residual, weight = torch.randn(3, 5, 40), torch.randn(3, 5, 40), torch.randn(40)
    y, s, mean, rstd = ops.norm(x, residual, weight, None, 1e-6, True)
    return torch.randn_like(y), torch.randn_like(s), s, weight, None, mean, rstd


def rope_case(shared_positions, sign):
    cos, sin = reference.rope_tables(16, 32, 10000.0, None, "cpu")
    positions = torch.randint(0, 32, (1 if shared_positions else 2, 6))
    return leaf(2, 4, 6, 16), leaf(2, 2, 6, 16), cos, sin, positions, sign


def linear_cross_entropy_case():
    """h [37, 16], a 29-token head, every third target ignored: the row weights the public function makes."""
    targets = torch.randint(0, 29, (37,))
    targets[::3] = -1
    counted = (targets != -1).float()
    return leaf(37, 16), leaf(29, 16), targets, counted / counted.sum(), True, True


def sample_case(penalties: bool):
    """The draw's arguments for 3 rows of 50 tokens: a greedy row, a top-k row and a top-p row (row
    parameters as kernels.sampling.row_params makes them); with penalties, also token counts (written
    in place: the op declares it), a logit bias and log-probs."""
    from kernels import sampling

    f64 = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    pen = (f64(1.3, 1.0, 1.1), f64(0.5, 0.0, 0.2), f64(0.1, 0.0, 0.3)) if penalties else ()
    params = sampling.row_params(50, f64(0.0, 0.8, 1.2), torch.tensor([0, 5, 0]), f64(1.0, 1.0, 0.9), f64(0.0, 0.0, 0.05),
                                 torch.tensor([1, -7, 3]), *pen)
    counts = torch.randint(0, 3, (3, 50), dtype=torch.int32) if penalties else None
    bias = torch.randn(3, 50, dtype=torch.float64) if penalties else None
    return torch.randn(3, 50), *params, torch.tensor([4, 9, 2]), counts, bias, penalties, 0


# (op name, arguments): every op, with each optional argument given and not, both attention
# backward variants, grouped K/V heads, decode over a cache long enough to split the keys (and
# combine the splits), strided inputs. The forward ops' test_aot_dispatch_dynamic runs their
# backward ops too (traced on fake tensors, then run): one direct case each suffices for those.
OPCHECK_CASES = {
    "attention prefill MHA": ("flash_attention", lambda: attention_case(1, 2, 2, 17, 17, False, True)),
    "attention GQA padded atomic-dQ": ("flash_attention", lambda: attention_case(2, 4, 2, 5, 9, True, False)),
    "attention decode GQA split-KV padded": ("flash_attention", lambda: attention_case(1, 2, 1, 1, 65, True, True)),
    "attention decode static cache (kv_lens)": ("flash_attention", static_cache_attention_case),
    "attention backward": ("flash_attention_backward", attention_backward_case),
    "layer_norm": ("norm", lambda: (leaf(3, 5, 40), None, leaf(40), leaf(40), 1e-5, False)),
    "layer_norm no weight, bias": ("norm", lambda: (leaf(3, 5, 40), None, None, None, 1e-5, False)),
    "add_layer_norm no weight": ("norm", lambda: (leaf(3, 5, 40), leaf(3, 5, 40), None, leaf(40), 1e-5, False)),
    "rms_norm strided x": ("norm", lambda: (leaf(5, 80)[:, ::2], None, leaf(40), None, 1e-6, True)),
    "add_rms_norm": ("norm", lambda: (leaf(3, 5, 40), leaf(3, 5, 40), leaf(40), None, 1e-6, True)),
    "norm_backward add_rms_norm": ("norm_backward", norm_backward_case),
    "apply_rope GQA": ("apply_rope", lambda: rope_case(False, 1.0)),
    "apply_rope shared positions, inverse": ("apply_rope", lambda: rope_case(True, -1.0)),
    "swiglu halves of one projection": ("swiglu", lambda: leaf(3, 5, 80).chunk(2, dim=-1)),
    "swiglu_backward": ("swiglu_backward", lambda: (torch.randn(3, 40), torch.randn(3, 40), torch.randn(3, 40))),
    "linear_cross_entropy ignored targets": ("linear_cross_entropy", linear_cross_entropy_case),
    "sample greedy, top-k, top-p": ("sample", lambda: sample_case(False)),
    "sample penalties (counts written), bias, logprobs": ("sample", lambda: sample_case(True)),
}


def test_every_op_has_a_case():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("llm_engine::")}
    assert registered == {op for op, _ in OPCHECK_CASES.values()}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    name, make_args = OPCHECK_CASES[case]
    torch.library.opcheck(getattr(ops, name), make_args())


# 1 layer, n_embd 32, context 16: GPT-2 (2 heads of 16) and Llama (GQA 2:1, RoPE, SwiGLU).
CONFIGS = {
    "gpt2": GPTConfig(vocab_size=61, block_size=16, n_layer=1, n_head=2, n_embd=32),
    "llama": GPTConfig(arch="llama", bias=False, vocab_size=61, block_size=16, n_layer=1, n_head=2, n_kv_head=1,
                       n_embd=32, intermediate_size=48),
}
BATCH, PROMPT = 2, 8
KV_START = torch.tensor([0, 3])  # row 1 left-padded by 3 tokens


def train_step(model, idx, targets):
    _, loss = model(idx, targets, return_logits=False)  # as the training loop calls it: the fused loss
    loss.backward()
    return loss.detach()


def decode_step(model, idx, cache):
    """One token per row after a prefill: the step generate() repeats."""
    logits, _ = model(idx, cache=cache, kv_start=KV_START.to(idx.device), last_only=True)
    return logits


def prefilled(model, idx):
    """A KV cache holding the prompts idx (run eagerly)."""
    cache = KVCache(model.config, BATCH, model.config.block_size, idx.device, kv_cache_dtype(model))
    with torch.no_grad(), autocast_for(idx.device):
        model(idx, cache=cache, kv_start=KV_START.to(idx.device))
    return cache


def batch(vocab, device="cpu"):
    return torch.randint(0, vocab, (BATCH, PROMPT), device=device), torch.randint(0, vocab, (BATCH, PROMPT), device=device)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("arch", CONFIGS)
def test_no_graph_breaks(arch, backend):
    torch._dynamo.reset()
    model = GPT(CONFIGS[arch], backend=backend)
    idx, targets = batch(model.config.vocab_size)
    # trace_autograd_ops: Dynamo traces loss.backward() instead of breaking the graph there
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        train = torch._dynamo.explain(train_step)(model, idx, targets)
    cache = prefilled(model, idx)
    with torch.no_grad():
        decode = torch._dynamo.explain(decode_step)(model, idx[:, -1:], cache)
    for what, explained in (("training step", train), ("decode step", decode)):
        assert explained.graph_break_count == 0 and not explained.break_reasons, (what, explained.break_reasons)
        assert explained.graph_count == 1, what
    if backend == "triton":  # our kernels are in the graph, as ops (not run while tracing)
        code = train.graphs[0].code + decode.graphs[0].code
        assert "llm_engine.flash_attention" in code and "llm_engine.norm" in code


@pytest.mark.parametrize("arch", CONFIGS)
def test_aot_eager_compile_matches_eager(arch):
    """fullgraph=True: one graph or an error. The compiled forward and backward run the same ops, so
    logits, loss and gradients agree to 1e-5; so does a compiled decode step over a KV cache."""
    torch._dynamo.reset()
    model = GPT(CONFIGS[arch], backend="triton")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx, targets = batch(model.config.vocab_size)
    results = []
    for m in (model, compiled):
        logits, loss = m(idx, targets)
        loss.backward()
        results.append((logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (logits, loss, grads), (logits_c, loss_c, grads_c) = results
    torch.testing.assert_close(logits_c, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, atol=1e-5, rtol=0, msg=name)
    eager_cache, compiled_cache = prefilled(model, idx), prefilled(model, idx)
    with torch.no_grad():
        torch.testing.assert_close(decode_step(compiled, idx[:, -1:], compiled_cache),
                                   decode_step(model, idx[:, -1:], eager_cache), atol=1e-5, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", CONFIGS)
def test_inductor_compile_matches_eager_on_cuda(arch):
    """Inductor (the default backend) compiles the ops around our kernels, under bf16 autocast as the
    engine runs on CUDA: logits, loss and gradients within a few bf16 ulps (2^-8 relative) of eager,
    measured against each tensor's largest entry; the decode step too."""
    torch._dynamo.reset()
    model = GPT(CONFIGS[arch], backend="triton").cuda()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    idx, targets = batch(model.config.vocab_size, "cuda")
    results = []
    for m in (model, compiled):
        with autocast_for("cuda"):
            logits, loss = m(idx, targets)
        loss.backward()
        results.append((logits.float(), loss.float(), {n: p.grad for n, p in m.named_parameters()}))
    (logits, loss, grads), (logits_c, loss_c, grads_c) = results

    def close(got, want, what):
        err = (got.float() - want.float()).abs().max()
        assert err <= 2**-6 * want.float().abs().max() + 1e-6, (what, err.item())

    close(logits_c, logits, "logits")
    close(loss_c, loss, "loss")
    for name, grad in grads.items():
        close(grads_c[name], grad, name)
    with torch.no_grad(), autocast_for("cuda"):
        close(decode_step(compiled, idx[:, -1:], prefilled(model, idx)),
              decode_step(model, idx[:, -1:], prefilled(model, idx)), "decode logits")


def test_fused_loss_under_compile_with_ignored_tokens():
    """kernels.linear_cross_entropy compiled (fullgraph) gives eager's loss and gradients with ignored
    targets and a loss mask present, the case Liger's fused loss got wrong under compile (#1338)."""
    targets = torch.randint(0, 29, (3, 7))
    targets[0, :4] = -1
    mask = (torch.rand(3, 7) > 0.3).float()

    def loss(h, w):
        return kernels.linear_cross_entropy(h, w, targets, mask)

    h, w = leaf(3, 7, 16), leaf(29, 16)

    def value_and_grads(fn):
        value = fn(h, w)
        return (value.detach(), *torch.autograd.grad(value, (h, w)))

    eager = value_and_grads(loss)
    compiled = value_and_grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))  # the backward too
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
