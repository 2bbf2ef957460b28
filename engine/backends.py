"""The op interface and the backend registry.

A backend is a small object with the few ops the model needs. The model calls them and never
looks at the backend's name, so a new backend is one class and one line in BACKENDS.

    attention(q, k, v, causal, kv_start=None) -> [B, H, Sq, D]
        q: [B, H, Sq, D]; k, v: [B, Hkv, Sk, D] (Hkv divides H: grouped-query attention),
        Sk >= Sq, causal mask bottom-right aligned;
        kv_start: optional LongTensor[B], first real (non left-padding) position of each row.
    layer_norm(x, weight, bias, eps) -> y
    add_layer_norm(x, residual, weight, bias, eps) -> (layer_norm(x + residual), x + residual)
        residual: the residual stream; x: a sublayer's output to add to it (the model's `branch`)
    rms_norm(x, weight, eps) -> y
    add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)
    apply_rope(q, k, cos, sin, positions) -> (q, k)
        rotary embedding; cos, sin: [P, D/2] tables; positions: LongTensor[B or 1, T]
    swiglu(gate, up) -> silu(gate) * up
"""
import os

import torch
import torch.nn.functional as F

from engine import reference
from engine.errors import InputError


class ReferenceBackend:
    """The formulas, explicit and slow: the truth every other backend is checked against."""

    name = "reference"

    def attention(self, q, k, v, causal=True, kv_start=None):
        return reference.attention(q, k, v, causal=causal, kv_start=kv_start)

    def layer_norm(self, x, weight, bias, eps):
        return reference.layer_norm(x, weight, bias, eps)

    def add_layer_norm(self, x, residual, weight, bias, eps):
        s = x + residual
        return self.layer_norm(s, weight, bias, eps), s

    def rms_norm(self, x, weight, eps):
        return reference.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        s = x + residual
        return self.rms_norm(s, weight, eps), s

    def apply_rope(self, q, k, cos, sin, positions):
        return reference.apply_rope(q, k, cos, sin, positions)

    def swiglu(self, gate, up):
        return reference.swiglu(gate, up)


class TorchBackend(ReferenceBackend):
    """What a user would pick instead: PyTorch's fused SDPA and LayerNorm."""

    name = "torch"

    def attention(self, q, k, v, causal=True, kv_start=None):
        sq, sk = q.shape[-2], k.shape[-2]
        gqa = k.shape[1] < q.shape[1]
        if kv_start is None and (not causal or sq == sk or sq == 1):
            # a single query (a decode step) is the last position: it sees every key, no mask
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal and sq > 1, enable_gqa=gqa)
        # SDPA's is_causal is top-left aligned; with a KV cache (Sq < Sk) or padding we pass
        # the bottom-right aligned mask explicitly.
        mask = reference.attention_mask(sq, sk, causal, kv_start, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def layer_norm(self, x, weight, bias, eps):
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)

    def rms_norm(self, x, weight, eps):
        return F.rms_norm(x, x.shape[-1:], weight, eps)

    def apply_rope(self, q, k, cos, sin, positions):
        cos, sin = cos[positions][:, None], sin[positions][:, None]  # [B|1, 1, T, D/2]
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # [B|1, 1, T, D]

        def rotate(x):  # (a, b) -> (a·cos − b·sin, b·cos + a·sin), in x's dtype like Hugging Face
            a, b = x.chunk(2, dim=-1)
            return x * cos.to(x.dtype) + torch.cat([b, a], dim=-1) * sin.to(x.dtype)

        return rotate(q), rotate(k)

    def swiglu(self, gate, up):
        return F.silu(gate) * up


class TritonBackend(TorchBackend):
    """Our kernels from `kernels`: flash attention, fused (residual-add +) LayerNorm and RMSNorm,
    RoPE (q and k rotated in one launch) and fused SwiGLU. SwiGLU stays here only if
    benchmarks/swiglu.py shows it beating the torch backend's two ops on a GPU (issue 16; not yet
    measured)."""

    name = "triton"

    def __init__(self):
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            raise InputError(
                "backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels "
                "slowly on the CPU, for tests); use backend 'torch' (the CPU default) or "
                "'reference' instead"
            )
        try:
            import kernels
        except ImportError as err:
            raise RuntimeError(f"backend 'triton' needs the Triton kernels: {err}") from err
        self.kernels = kernels

    def attention(self, q, k, v, causal=True, kv_start=None):
        return self.kernels.flash_attention(q, k, v, causal=causal, kv_start=kv_start)

    def layer_norm(self, x, weight, bias, eps):
        return self.kernels.layer_norm(x, weight, bias, eps)

    def add_layer_norm(self, x, residual, weight, bias, eps):
        return self.kernels.add_layer_norm(x, residual, weight, bias, eps)

    def rms_norm(self, x, weight, eps):
        return self.kernels.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return self.kernels.add_rms_norm(x, residual, weight, eps)

    def apply_rope(self, q, k, cos, sin, positions):
        return self.kernels.apply_rope(q, k, cos, sin, positions)

    def swiglu(self, gate, up):
        return self.kernels.swiglu(gate, up)


BACKENDS = {"reference": ReferenceBackend, "torch": TorchBackend, "triton": TritonBackend}


def resolve_name(name: str, device=None) -> str:
    """'auto' means triton on CUDA, torch elsewhere."""
    if name == "auto":
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return "triton" if on_cuda else "torch"
    if name not in BACKENDS:
        raise InputError(f"backend must be one of {['auto', *BACKENDS]}, got {name!r}")
    return name


def get_backend(name: str, device=None):
    return BACKENDS[resolve_name(name, device)]()
