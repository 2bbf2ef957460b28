"""The op interface and the backend registry.

A backend is a small object with the few ops the model needs. The model calls them and never
looks at the backend's name, so a new backend is one class and one line in BACKENDS.

    attention(q, k, v, causal, kv_start=None, kv_lens=None) -> [B, H, Sq, D]
        q: [B, H, Sq, D]; k, v: [B, Hkv, Sk, D] (Hkv divides H: grouped-query attention),
        Sk >= Sq, causal mask bottom-right aligned;
        kv_start: optional LongTensor[B], first real (non left-padding) position of each row;
        kv_lens: optional LongTensor[B]: k, v are a whole preallocated cache whose row b holds
        kv_lens[b] keys (static shapes for a compiled decode step; inference only).
    attention_with_cache(q, k, v, k_cache, v_cache, start, kv_start=None) -> [B, H, Sq, D]
        writes k, v [B, Hkv, Sq, D] into columns [start, start + Sq) of the KV cache's
        k_cache, v_cache [B, Hkv, max_len, D], then attention(q, the cache's columns
        [0, start + Sq), causal=True, kv_start): an eager decode step's attention as one op
    layer_norm(x, weight, bias, eps) -> y
    add_layer_norm(x, residual, weight, bias, eps) -> (layer_norm(x + residual), x + residual)
        residual: the residual stream; x: a sublayer's output to add to it (the model's `branch`)
    rms_norm(x, weight, eps) -> y
    add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)
    apply_rope(q, k, cos, sin, positions) -> (q, k)
        rotary embedding; cos, sin: [P, D/2] tables; positions: LongTensor[B or 1, T]
    swiglu(gate, up) -> silu(gate) * up
    linear_cross_entropy(h, weight, targets, loss_mask) -> loss
        GPT.loss(h @ weight.T, targets, loss_mask) (mean over counted tokens, targets -1 ignored)
        without holding the [N, V] logits whole in the torch and triton backends;
        h: [B, T, C], weight: [V, C] (the head), targets, loss_mask: [B, T]
    decoder(model, cache, kv_start) -> step or None
        a decode step outside the model's modules, where the backend has one (the torch backend on
        the CPU: engine/cpu_decode.py): step(tokens [B, 1]) -> the last position's logits [B, V]
        (a tensor, or a NumPy array that the next step may overwrite), what
        model(tokens, cache=cache, kv_start=kv_start)[0][:, -1] holds, appending to and advancing the cache
"""
import os

import torch
import torch.nn.functional as F

from engine import cpu_decode, native, reference
from engine.errors import InputError


class ReferenceBackend:
    """The formulas, explicit and slow: the truth every other backend is checked against."""

    name = "reference"

    def attention(self, q, k, v, causal=True, kv_start=None, kv_lens=None):
        return reference.attention(q, k, v, causal=causal, kv_start=kv_start, kv_lens=kv_lens)

    def attention_with_cache(self, q, k, v, k_cache, v_cache, start, kv_start=None):
        T = k.shape[2]
        k_cache.narrow(2, start, T).copy_(k)
        v_cache.narrow(2, start, T).copy_(v)
        return self.attention(q, k_cache.narrow(2, 0, start + T), v_cache.narrow(2, 0, start + T), causal=True,
                              kv_start=kv_start)

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

    def linear_cross_entropy(self, h, weight, targets, loss_mask=None):
        return reference.linear_cross_entropy(h, weight, targets, loss_mask)

    def decoder(self, model, cache, kv_start=None):
        return None  # decode steps run the model's forward


def autocast_inputs(*tensors):
    """The tensors in autocast's dtype when autocast is on for their device (as F.linear would
    cast them), else as they are."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    return tuple(t.to(torch.get_autocast_dtype(device)) for t in tensors)


def chunk_rows(n: int, c: int, v: int) -> int:
    """Rows per chunk of the chunked cross-entropy: a [rows, V] chunk of about 4 · N · C elements
    (four times h), at least 64 rows, at most N."""
    return max(1, min(n, max(64, -(-4 * n * c // v))))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ_i w_i · (logsumexp(h_i · Wᵀ) − h_i · W_{t_i}) over chunks of rows, in fp32: the forward
    keeps only each row's log-sum-exp; the backward recomputes each chunk's logits.
    h: [N, C]; weight: [V, C]; targets: [N] (any id where w is 0); w: [N] fp32 row weights."""

    @staticmethod
    def forward(ctx, h, weight, targets, w):
        n, v = h.shape[0], weight.shape[0]
        rows = chunk_rows(n, h.shape[1], v)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            logits = (h[sl] @ weight.T).float()  # [rows, V]
            lse[sl] = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, targets[sl, None])[:, 0]
            loss += torch.where(w[sl] != 0, w[sl] * (lse[sl] - target_logit), 0.0).sum()
        ctx.save_for_backward(h, weight, targets, w, lse)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, weight, targets, w, lse = ctx.saved_tensors
        n = h.shape[0]
        rows = chunk_rows(n, h.shape[1], weight.shape[0])
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        scale = (w * grad)[:, None]  # [N, 1]
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            dz = (h[sl] @ weight.T).float().sub_(lse[sl, None]).exp_()  # softmax, [rows, V]
            dz.scatter_add_(1, targets[sl, None], torch.full_like(dz[:, :1], -1.0))  # − onehot(t)
            dz = dz.mul_(scale[sl]).to(h.dtype)
            if dh is not None:
                torch.mm(dz, weight, out=dh[sl])
            if dw is not None and dz.dtype == torch.float32:  # summed in fp32 over the chunks
                dw.addmm_(dz.T, h[sl])
            elif dw is not None:
                dw.add_(dz.T @ h[sl])
        return dh, None if dw is None else dw.to(weight.dtype), None, None


def chunked_linear_cross_entropy(h, weight, targets, loss_mask=None, ignore_index=-1):
    """reference.linear_cross_entropy (reduction "mean") by ChunkedLinearCrossEntropy: the logits
    exist one chunk of rows at a time, in the forward and again in the backward."""
    h, weight = autocast_inputs(h, weight)
    t = targets.reshape(-1)
    counted = reference.loss_weights(targets, loss_mask, ignore_index)
    w = counted / counted.sum().clamp(min=1.0)
    with torch.autocast(h.device.type, enabled=False):
        return ChunkedLinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, torch.where(counted != 0, t, 0), w)


_DECODE_ATTENTION = native.extension("_decode_attention")  # None: not built, SDPA does it (slower)
_CPU_DECODE_DTYPES = (torch.float32, torch.float64)  # what the extension computes in


def cpu_decode_attention(q, k, v, kv_start=None, kv_lens=None, new_k=None, new_v=None, at=-1):
    """Attention of one query per row on the CPU by the C++ extension (csrc/decode_attention.cpp),
    or None where it does not apply: not a single query, not float32/float64 on the CPU, autograd
    recording, last dimensions not contiguous, under torch.compile (which traces SDPA instead), or
    the extension not built.

    Same arguments and result as the backend's attention; q [B, H, 1, D] is the last position, so
    it sees every key (from kv_start[b], up to kv_lens[b]). new_k, new_v [B, Hkv, 1, D]: first
    written into column `at` of k, v (the whole cache), then keys up to at + 1 are attended. The
    result is a [B, H, 1, D] view of a [B, 1, H, D] tensor, so the model's transpose back to
    [B, 1, H·D] is free. The extension reads the tensors in place (converting them to NumPy arrays
    cost 30% of a batch-1 step's dispatched ops) and checks their shapes and strides."""
    # (spelled out, not a loop over the tensors: this runs once a layer in every decode step)
    dtype = q.dtype
    if (_DECODE_ATTENTION is None or q.shape[-2] != 1 or dtype not in _CPU_DECODE_DTYPES
            or not (q.is_cpu and k.is_cpu and v.is_cpu) or not dtype == k.dtype == v.dtype
            or not q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    if new_k is not None and not (new_k.is_cpu and new_v.is_cpu and new_k.dtype == new_v.dtype == dtype
                                  and new_k.stride(-1) == new_v.stride(-1) == 1
                                  and not (torch.is_grad_enabled() and (new_k.requires_grad or new_v.requires_grad))):
        return None
    if kv_start is not None or kv_lens is not None:  # int64 on the CPU, as the extension reads them
        kv_start, kv_lens = (t if t is None else t.to("cpu", torch.int64) for t in (kv_start, kv_lens))
    out = _DECODE_ATTENTION.decode_attention(q, k, v, kv_start, kv_lens, q.shape[-1] ** -0.5, torch.get_num_threads(),
                                             new_k, new_v, at)
    return torch.from_numpy(out).transpose(1, 2)  # [B, 1, H, D] -> [B, H, 1, D]


class TorchBackend(ReferenceBackend):
    """What a user would pick instead: PyTorch's fused SDPA and LayerNorm, and a chunked
    cross-entropy (so training on the CPU saves the logits' memory too). A decode step's attention
    on the CPU (one query per row) runs in the C++ extension when it is built: PyTorch's CPU SDPA
    reads the KV cache at about half the speed there (benchmarks/generate.py, issue 21)."""

    name = "torch"

    def attention(self, q, k, v, causal=True, kv_start=None, kv_lens=None):
        sq, sk = q.shape[-2], k.shape[-2]
        if (out := cpu_decode_attention(q, k, v, kv_start, kv_lens)) is not None:  # one query on the CPU
            return out
        gqa = k.shape[1] < q.shape[1]
        if kv_start is None and kv_lens is None and (not causal or sq == sk or sq == 1):
            # a single query (a decode step) is the last position: it sees every key, no mask
            # (a branch: under torch.compile's dynamic shapes sq > 1 is a SymBool, which SDPA's is_causal refuses)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True if causal and sq > 1 else False, enable_gqa=gqa)
        # SDPA's is_causal is top-left aligned; with a KV cache (Sq < Sk) or padding we pass
        # the bottom-right aligned mask explicitly.
        mask = reference.attention_mask(sq, sk, causal, kv_start, device=q.device, kv_lens=kv_lens)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def attention_with_cache(self, q, k, v, k_cache, v_cache, start, kv_start=None):
        if (out := cpu_decode_attention(q, k_cache, v_cache, kv_start, None, k, v, start)) is not None:
            return out
        return super().attention_with_cache(q, k, v, k_cache, v_cache, start, kv_start)

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

    def linear_cross_entropy(self, h, weight, targets, loss_mask=None):
        return chunked_linear_cross_entropy(h, weight, targets, loss_mask)

    def decoder(self, model, cache, kv_start=None):
        return cpu_decode.decoder(model, cache, kv_start)


class TritonBackend(TorchBackend):
    """Our kernels from `kernels`: flash attention, fused (residual-add +) LayerNorm and RMSNorm,
    RoPE (q and k rotated in one launch), fused SwiGLU and fused linear + cross-entropy. SwiGLU
    stays here only if benchmarks/swiglu.py shows it beating the torch backend's two ops on a GPU
    (issue 16; not yet measured)."""

    name = "triton"
    # the attention backward: separate dQ pass (bitwise repeatable) or atomic dQ; TrainConfig sets it
    deterministic = True

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

    def attention(self, q, k, v, causal=True, kv_start=None, kv_lens=None):
        return self.kernels.flash_attention(q, k, v, causal=causal, kv_start=kv_start, kv_lens=kv_lens,
                                            deterministic=self.deterministic)

    # the plain write-then-attend and the model's forward, so that decode runs our kernels, not the
    # torch backend's CPU paths
    attention_with_cache = ReferenceBackend.attention_with_cache
    decoder = ReferenceBackend.decoder

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

    def linear_cross_entropy(self, h, weight, targets, loss_mask=None):
        return self.kernels.linear_cross_entropy(h, weight, targets, loss_mask)


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
