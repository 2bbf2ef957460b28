"""The pure-PyTorch reference ops, written from the formulas.

Slow on purpose: explicit matmuls, an explicit mask, statistics from their definitions,
math in float32 (or float64 when given float64). Every fast path is tested against these.
"""
import math

import torch


def attention_mask(sq: int, sk: int, causal: bool, kv_start=None, device=None, kv_lens=None):
    """Boolean [B or 1, 1, Sq, Sk] mask, True where query i may look at key j.

    Queries sit at the end of the key axis: query i is at absolute position i + (sk - sq),
    so causal masking is bottom-right aligned (the KV-cache case).
    kv_start (LongTensor[B], optional) marks left padding: row b's real tokens start at
    kv_start[b]. A real query never sees a padding key; a padding query sees only padding
    keys (its output is ignored, but stays finite).
    kv_lens (LongTensor[B], optional): the keys are a whole preallocated cache of which row b
    holds the first kv_lens[b]; its queries are the last sq of those, and later keys are unseen.
    """
    lens = sk if kv_lens is None else kv_lens.to(device).view(-1, 1, 1, 1)  # keys each row holds
    q_pos = torch.arange(sq, device=device).view(1, 1, sq, 1) + (lens - sq)  # [1|B, 1, Sq, 1]
    k_pos = torch.arange(sk, device=device).view(1, 1, 1, sk)  # [1, 1, 1, Sk]
    mask = (k_pos < lens) & (k_pos <= q_pos if causal else True)  # [1|B, 1, Sq, Sk]
    if kv_start is not None:
        start = kv_start.to(device).view(-1, 1, 1, 1)
        mask = mask & ((k_pos >= start) == (q_pos >= start))
    return mask.expand(-1, 1, sq, sk)


def attention(q, k, v, causal=True, sm_scale=None, kv_start=None, kv_lens=None):
    """softmax(Q Kᵀ · scale + mask) · V.  q: [B, H, Sq, D], k, v: [B, Hkv, Sk, D], Sk >= Sq.

    Grouped-query attention when Hkv < H (Hkv divides H): query head h uses key/value head
    h // (H / Hkv), so each K/V head serves a group of H / Hkv consecutive query heads.
    kv_lens: k, v are a whole preallocated cache, row b holding kv_lens[b] keys (attention_mask).
    """
    sq, sk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if sk < sq:
        raise ValueError(f"attention needs Sk >= Sq, got Sq={sq}, Sk={sk}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention needs Hkv to divide H, got H={q.shape[1]}, Hkv={k.shape[1]}")
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [B, H, Sk, D]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale  # [B, H, Sq, Sk]
    mask = attention_mask(sq, sk, causal, kv_start, device=q.device, kv_lens=kv_lens)
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



def rms_norm(x, weight=None, eps=1e-6):
    """x / sqrt(mean(x²) + eps) * weight over the last dimension."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    y = xf / torch.sqrt((xf * xf).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(compute)
    return y.to(x.dtype)


def add_rms_norm(x, residual, weight=None, eps=1e-6):
    """s = x + residual; y = rms_norm(s). Returns (y, s)."""
    s = x + residual
    return rms_norm(s, weight, eps), s


def rope_tables(head_dim: int, length: int, theta: float, scaling=None, device=None):
    """(cos, sin), each [length, head_dim / 2]: the rotation angles position · frequency_i of the
    rotary embedding, frequency_i = theta^(-2i / head_dim), in float32 (as Hugging Face computes them).

    scaling (Llama 3): frequencies whose wavelength exceeds the original context are divided by
    `factor`, those shorter than original / high_freq_factor kept, those between blended smoothly.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))  # [hd/2]
    if scaling is not None:
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: long wavelengths, 1: short ones
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    angles = torch.arange(length, device=device).float()[:, None] * inv_freq[None, :]  # [length, hd/2]
    return angles.cos(), angles.sin()


def apply_rope(q, k, cos, sin, positions):
    """Rotate q [B, H, T, D] and k [B, Hkv, T, D] by their positions' angles. Returns (q, k).

    cos, sin: [P, D/2] tables (rope_tables); positions: LongTensor [B or 1, T], each token's
    position (per row: left padding and KV-cache offsets shift them). Dimension i is paired with
    i + D/2 (the "rotate half" layout of Hugging Face's Llama), and each pair (a, b) becomes
    (a·cos − b·sin, b·cos + a·sin).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    cos = cos[positions][:, None].to(compute)  # [B|1, 1, T, D/2]
    sin = sin[positions][:, None].to(compute)

    def rotate(x):
        a, b = x.to(compute).chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def swiglu(gate, up):
    """silu(gate) · up, silu(x) = x · sigmoid(x): the Llama MLP's activation."""
    compute = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g = gate.to(compute)
    return (g * torch.sigmoid(g) * up.to(compute)).to(gate.dtype)


def loss_weights(targets, loss_mask=None, ignore_index=-1, dtype=torch.float32):
    """What each token's loss counts for, over the flattened targets [N]: (t_i != ignore_index) · loss_mask_i."""
    counted = (targets.reshape(-1) != ignore_index).to(dtype)
    return counted if loss_mask is None else counted * loss_mask.reshape(-1).to(dtype)


def linear_cross_entropy(h, weight, targets, loss_mask=None, ignore_index=-1, reduction="mean"):
    """Cross-entropy of the logits h @ weightᵀ: −log softmax(h_i · Wᵀ)[t_i], weighted by
    counted_i = (t_i != ignore_index) · loss_mask_i, then summed ("sum") or divided by Σ counted_i
    ("mean"; 0 when nothing counts). h: [..., C]; weight: [V, C]; targets, loss_mask: [...]."""
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    logits = h.to(compute).reshape(-1, h.shape[-1]) @ weight.to(compute).T  # [N, V]
    t = targets.reshape(-1)
    counted = loss_weights(targets, loss_mask, ignore_index, compute)
    log_probs = torch.log_softmax(logits, dim=-1)
    per_token = -log_probs.gather(1, torch.where(counted != 0, t, 0)[:, None])[:, 0]  # [N]
    total = torch.where(counted != 0, per_token * counted, 0.0).sum()
    return total / counted.sum().clamp(min=1.0) if reduction == "mean" else total
