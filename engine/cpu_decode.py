"""A decode step on the CPU as one C++ call (csrc/decode_step.cpp), for GPT-2 and the Llama family:
the torch backend's way to run `model(tokens, cache=cache, kv_start=kv_start)` for one new token
per row.

At batch 1 a small model's step is mostly not its matmuls: on the 6-layer/192-wide benchmark
model the 25 matmuls take ~0.8 ms and the ~100 small ops between them, dispatched one by one
from Python, ~1 ms more. The C++ step calls the same BLAS that torch's CPU build carries (MKL or
OpenBLAS, inside libtorch_cpu) for the matmuls, and does the norms, GELU / SwiGLU, RoPE, residual
adds, cache append and attention (csrc/attention.h, as engine._decode_attention) in plain loops.

`decoder(model, cache, kv_start)` returns the step, or None where it does not apply, and the
model's own forward runs instead: not float32/float64 on the CPU, a static cache, autocast on,
forward hooks on the model's modules (a hook would silently not run), or the extension or
torch's BLAS not found.
"""
import ctypes
import functools
from pathlib import Path

import torch

from engine import native

_decode_step = native.extension("_decode_step")  # None: not built, the model's forward runs

_STEPS = {torch.float32: ("StepFloat32", "sgemm_"), torch.float64: ("StepFloat64", "dgemm_")}


@functools.cache
def torch_blas_gemm(name: str) -> int | None:
    """The address of BLAS routine `name` (sgemm_ / dgemm_) in torch's CPU library, or None.
    (torch loads that library privately, so it is looked up there, not in the process's global scope.)"""
    for path in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            return ctypes.cast(getattr(ctypes.CDLL(str(path)), name), ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


def _hooked(model) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()) or bool(
        torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks)


def decoder(model, cache, kv_start=None):
    """step(tokens [B, 1] int64) -> logits [B, V], a NumPy array of the model's dtype equal (to float
    rounding) to model(tokens, cache=cache, kv_start=kv_start)[0][:, -1], the cache appended and
    advanced the same; the same array every step, overwritten by the next. None where the C++ step
    does not apply (module docstring). Reads the weights and the cache in place: build it after
    the prefill, use it for one generation."""
    c = model.config
    weight = model.lm_head.weight
    if (_decode_step is None or weight.device.type != "cpu" or weight.dtype not in _STEPS
            or cache.static or cache.k.dtype != weight.dtype or model.training or torch.is_autocast_enabled("cpu")
            or any(p.dtype != weight.dtype for p in model.parameters()) or _hooked(model)):
        return None
    cls, gemm_name = _STEPS[weight.dtype]
    gemm = torch_blas_gemm(gemm_name)
    if gemm is None:
        return None
    params = dict(model.named_parameters(remove_duplicate=False))
    named = lambda prefix, names: {n: params.get(prefix + n) for n in names}  # noqa: E731  (None: no bias)
    block = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.weight", "attn.c_attn.bias",
             "attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias", "attn.q_norm.weight", "attn.k_norm.weight")
    layers = [named(f"transformer.h.{i}.", block) for i in range(c.n_layer)]
    weights = {"wte": model.transformer.wte.weight, "lm_head.weight": weight,
               **named("transformer.", ("ln_f.weight", "ln_f.bias"))}
    llama = c.arch == "llama"
    if llama:  # the model's RoPE angle tables, in its dtype (as the torch backend casts them)
        cos, sin = model.transformer.wpe.angle_tables(weight.device)
        weights.update(rope_cos=cos.to(weight.dtype).flatten(), rope_sin=sin.to(weight.dtype).flatten())
    else:
        weights["wpe"] = model.transformer.wpe.weight
    shape = dict(n_embd=c.n_embd, n_head=c.n_head, n_kv_head=c.n_kv_head, head_dim=c.head_dim,
                 intermediate_size=c.intermediate_size, vocab_size=weight.shape[0], block_size=c.block_size,
                 eps=c.rms_norm_eps if llama else c.layer_norm_epsilon, rms_norm=llama, swiglu=llama, rotary=llama,
                 qk_norm=bool(c.qk_norm))
    if kv_start is not None:
        kv_start = kv_start.to("cpu", torch.int64)
    run = getattr(_decode_step, cls)(weights, layers, shape, cache.k, cache.v, kv_start, gemm)

    def step(tokens):
        logits = run(tokens, cache.pos, torch.get_num_threads())
        cache.advance(1)
        return logits

    return step
