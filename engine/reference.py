"""The pure-PyTorch reference ops, written from the formulas.

Slow on purpose: explicit matmuls, an explicit mask, statistics from their definitions,
math in float32 (or float64 when given float64). Every fast path is tested against these.
"""
import math

import torch


def attention_mask(sq: int, sk: int, causal: bool, kv_start=None, device=None):
    """Boolean [B or 1, 1, Sq, Sk] mask, True where query i may look at key j.

    Queries sit at the end of the key axis: query i is at absolute position i + (sk - sq),
    so causal masking is bottom-right aligned (the KV-cache case).
    kv_start (LongTensor[B], optional) marks left padding: row b's real tokens start at
    kv_start[b]. A real query never sees a padding key; a padding query sees only padding
    keys (its output is ignored, but stays finite).
    """
    q_pos = torch.arange(sq, device=device)[:, None] + (sk - sq)  # [Sq, 1]
    k_pos = torch.arange(sk, device=device)[None, :]  # [1, Sk]
    mask = (k_pos <= q_pos) if causal else torch.ones(sq, sk, dtype=torch.bool, device=device)
    mask = mask[None, None]  # [1, 1, Sq, Sk]
    if kv_start is not None:
        start = kv_start.to(device).view(-1, 1, 1, 1)
        mask = mask & ((k_pos >= start) == (q_pos >= start))
    return mask


def attention(q, k, v, causal=True, sm_scale=None, kv_start=None):
    """softmax(Q Kᵀ · scale + mask) · V.  q: [B, H, Sq, D], k, v: [B, H, Sk, D], Sk >= Sq."""
    sq, sk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if sk < sq:
        raise ValueError(f"attention needs Sk >= Sq, got Sq={sq}, Sk={sk}")
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale  # [B, H, Sq, Sk]
    mask = attention_mask(sq, sk, causal, kv_start, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v.to(compute)).to(q.dtype)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension (biased variance)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    mean = xf.mean(dim=-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (xf - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
    """s = x + residual; y = layer_norm(s). Returns (y, s)."""
    s = x + residual
    return layer_norm(s, weight, bias, eps), s

