"""GPT-2 and the Llama family, top-down: GPT -> Block -> (CausalSelfAttention, MLP).

The two families differ in three small pieces, picked once in `PIECES` from config.arch:
the norm (LayerNorm / RMSNorm), the MLP (GELU / SwiGLU) and the positions (a learned table
added to the embeddings / a rotation of q and k). Everything else is shared, including
grouped-query attention (n_kv_head < n_head), which GPT-2 simply doesn't use.

Weights are plain nn.Linear / nn.Embedding / norm parameters with nanoGPT's names, so a
state_dict is the same whatever backend runs it. Every op with a fast path (attention, the
norms and their residual-add, RoPE, SwiGLU) comes from the backend (engine/backends.py); the
model never branches on the backend's name. The residual stream is called `stream`; a
sublayer's output on its way to being added to it is the `branch`.

Shapes: B batch, T sequence, C n_embd, nh heads, nkv key/value heads, hd head dim, V vocab.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import reference
from engine.backends import get_backend, resolve_name
from engine.config import GPTConfig


def dropout(x, p: float, training: bool):
    """F.dropout, skipped where it does nothing (p = 0 or eval): a decode step would call it 3 times a layer."""
    return F.dropout(x, p, training) if training and p > 0 else x


class LayerNorm(nn.Module):
    """LayerNorm parameters (weight, optional bias) with nanoGPT's names. The model normalises
    through the backend with `add_then_norm`; `forward` is plain PyTorch, for code that calls
    the module directly (`block.ln_1(h)`)."""

    def __init__(self, n: int, bias: bool, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)

    def add_then_norm(self, stream, branch, ops):
        """Add a sublayer's output (branch, None for nothing) to the residual stream and normalise
        the sum, in one fused pass: -> (layer_norm(stream + branch), stream + branch)."""
        if branch is None:
            return ops.layer_norm(stream, self.weight, self.bias, self.eps), stream
        return ops.add_layer_norm(x=branch, residual=stream, weight=self.weight, bias=self.bias, eps=self.eps)


class RMSNorm(nn.Module):
    """RMSNorm (Llama): x / rms(x) * weight, no mean subtracted, no bias. Same face as LayerNorm."""

    def __init__(self, n: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)

    def add_then_norm(self, stream, branch, ops):
        """-> (rms_norm(stream + branch), stream + branch); branch None adds nothing."""
        if branch is None:
            return ops.rms_norm(stream, self.weight, self.eps), stream
        return ops.add_rms_norm(x=branch, residual=stream, weight=self.weight, eps=self.eps)


class LearnedPositions(nn.Embedding):
    """GPT-2: a learned vector per position, added to the token embeddings; q and k stay as they are."""

    def __init__(self, config: GPTConfig):
        super().__init__(config.block_size, config.n_embd)

    def embed(self, tokens, pos):
        return tokens + self(pos)  # [B, T, C]

    def rotation(self, pos, ops):
        return None  # the positions are in the embeddings already


class RotaryPositions(nn.Module):
    """Llama: nothing learned; each (q, k) pair of dimensions is rotated by an angle proportional
    to the token's position (RoPE), so q·k depends on how far apart the two tokens are."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tables = {}  # device -> (cos, sin) [block_size, hd/2], made on first use (not weights)

    def embed(self, tokens, pos):
        return tokens

    def angle_tables(self, device):
        """(cos, sin) [block_size, hd/2] on `device` (float32, as Hugging Face computes them), made once."""
        if device not in self.tables:
            c = self.config
            self.tables[device] = reference.rope_tables(c.head_dim, c.block_size, c.rope_theta, c.rope_scaling, device)
        return self.tables[device]

    def rotation(self, pos, ops):
        """q, k -> q, k rotated to positions pos [B or 1, T]."""
        cos, sin = self.angle_tables(pos.device)
        return lambda q, k: ops.apply_rope(q, k, cos, sin, pos)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.layer_idx, self.dropout = layer_idx, config.dropout
        n_qkv = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, n_qkv, bias=config.bias or config.attn_bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        # Qwen3 normalises each head of q and k (over hd) before rotating them
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x, ops, cache=None, pos=None, kv_start=None, rotate=None):
        """rotate: q, k -> q, k rotated to this forward's positions (RoPE), None for learned positions;
        pos [1, T]: the cache columns this forward's tokens go to."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, nh + 2·nkv, T, hd]
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)  # [B, nh | nkv, T, hd]
        if self.q_norm is not None:
            q, _ = self.q_norm.add_then_norm(q, None, ops)
            k, _ = self.k_norm.add_then_norm(k, None, ops)
        if rotate is not None:
            q, k = rotate(q, k)
        if cache is None:
            y = ops.attention(q, k, v, causal=True, kv_start=kv_start)  # [B, nh, T, hd]
        else:  # append this step's keys/values, attend over everything cached so far
            y = cache.attend(self.layer_idx, q, k, v, pos, kv_start, ops)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """GPT-2: Linear -> GELU (tanh) -> Linear."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.dropout = config.dropout
        self.c_fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x, ops=None):  # GELU has no backend op
        x = F.gelu(self.c_fc(x), approximate="tanh")
        return dropout(self.c_proj(x), self.dropout, self.training)


class SwiGLUMLP(nn.Module):
    """Llama: silu(gate) * up -> Linear. c_fc holds the gate and up projections as one matmul
    (rows [0, I) gate, [I, 2I) up)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.dropout = config.dropout
        self.c_fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x, ops):
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # [B, T, I] each
        return dropout(self.c_proj(ops.swiglu(gate, up)), self.dropout, self.training)


# What differs between the families, in one place.
PIECES = {
    "gpt2": dict(norm=lambda c: LayerNorm(c.n_embd, c.bias, c.layer_norm_epsilon), mlp=MLP, positions=LearnedPositions),
    "llama": dict(norm=lambda c: RMSNorm(c.n_embd, c.rms_norm_eps), mlp=SwiGLUMLP, positions=RotaryPositions),
}


class Block(nn.Module):
    """Pre-norm block. A block hands the next one the residual stream and its MLP's output
    (the branch) still apart: the next norm adds them in the same pass that normalises."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        pieces = PIECES[config.arch]
        self.ln_1 = pieces["norm"](config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = pieces["norm"](config)
        self.mlp = pieces["mlp"](config)

    def forward(self, stream, branch, ops, cache=None, pos=None, kv_start=None, rotate=None):
        """stream: the residual stream [B, T, C]; branch: the previous block's MLP output, not yet
        added to it (None in the first block); rotate: q, k -> q, k at this forward's positions, or None.
        Returns (stream, this block's MLP output)."""
        h, stream = self.ln_1.add_then_norm(stream, branch, ops)
        branch = self.attn(h, ops, cache, pos, kv_start, rotate)
        h, stream = self.ln_2.add_then_norm(stream, branch, ops)
        return stream, self.mlp(h, ops)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        pieces = PIECES[config.arch]
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=pieces["positions"](config),  # learned (GPT-2) or rotary: no weights (Llama)
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=pieces["norm"](config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's init, for both families: residual projections scaled by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.set_backend(backend)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_backend(self, name: str) -> "GPT":
        """Pick the ops ("auto", "reference", "torch", "triton"). Weights are untouched.
        "auto" is resolved per call from the input's device: triton on CUDA, torch elsewhere."""
        if name != "auto":
            get_backend(name)  # fail now, with the reason, rather than at the first forward
        self.backend = resolve_name(name) if name != "auto" else "auto"
        self._ops = {}
        return self

    def resize_vocab(self, vocab_size: int) -> "GPT":
        """Grow the token table (and an untied head) to vocab_size; new rows get GPT-2's init. For adding tokens."""
        old = self.transformer.wte.weight
        if vocab_size < old.shape[0]:
            raise ValueError(f"resize_vocab only grows the vocabulary: {old.shape[0]} -> {vocab_size}")

        def grown(weight):
            new = torch.empty(vocab_size, weight.shape[1], device=weight.device, dtype=weight.dtype)
            nn.init.normal_(new, mean=0.0, std=0.02)
            with torch.no_grad():
                new[: weight.shape[0]] = weight
            return nn.Parameter(new)

        head = self.lm_head.weight
        self.transformer.wte = nn.Embedding(vocab_size, old.shape[1], _weight=grown(old))
        self.lm_head = nn.Linear(old.shape[1], vocab_size, bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = self.transformer.wte.weight if self.config.tie_embeddings else grown(head)
        self.config.vocab_size = vocab_size
        return self

    def decode_layout(self) -> "GPT":
        """Store every Linear weight input-major: the same [out, in] values, shapes and state_dict,
        as the transposed view of a contiguous [in, out] matrix. F.linear then multiplies by a
        contiguous matrix, which PyTorch's CPU GEMM does faster at decode sizes (one thread,
        192 wide: 1.5x for the QKV matmul at batch 1, 1.9x for a 4096-token head at batch 8).
        Generation on the CPU calls it; training and checkpoints work in either layout."""
        with torch.inference_mode(False), torch.no_grad():  # inference tensors could not be trained later
            for module in self.modules():
                if isinstance(module, nn.Linear) and module.weight.is_contiguous():
                    module.weight.data = module.weight.data.t().contiguous().t()
        return self

    def ops_for(self, device: torch.device):
        name = resolve_name(self.backend, device)
        if name not in self._ops:
            self._ops[name] = get_backend(name, device)
        return self._ops[name]

    def forward(self, idx, targets=None, loss_mask=None, cache=None, kv_start=None, last_only=False,
                return_logits=True):
        """idx: [B, T] token ids. Returns (logits [B, T, V] (or [B, 1, V] with last_only), loss).

        targets: [B, T] next-token ids (-1 = ignore); loss_mask: [B, T], 1 where a target counts.
        return_logits=False (with targets): (None, loss), the loss from the backend's fused linear +
        cross-entropy, so the [B, T, V] logits never exist (training's memory peak).
        cache: a KV cache (engine.generate.KVCache) to append to; kv_start: LongTensor[B], the
        first real position of each left-padded row (positions count from there).
        """
        B, T = idx.shape
        end = T if cache is None or cache.static else cache.pos + T  # (a static cache was sized to fit)
        if end > self.config.block_size:
            raise ValueError(f"sequence length {end} exceeds block_size {self.config.block_size}")
        columns = torch.arange(T, device=idx.device)[None] if cache is None else cache.positions(T)  # [1, T]
        pos = columns if kv_start is None else (columns - kv_start[:, None]).clamp(min=0)  # [1 or B, T]
        ops = self.ops_for(idx.device)
        positions = self.transformer.wpe
        stream = dropout(positions.embed(self.transformer.wte(idx), pos), self.config.dropout, self.training)
        rotate = positions.rotation(pos, ops)
        branch = None
        for block in self.transformer.h:
            stream, branch = block(stream, branch, ops, cache, columns, kv_start, rotate)
        h, _ = self.transformer.ln_f.add_then_norm(stream, branch, ops)  # [B, T, C]
        if cache is not None:
            cache.advance(T)
        if targets is None:
            return self.lm_head(h[:, -1:] if last_only else h), None
        if not return_logits:
            return None, ops.linear_cross_entropy(h, self.lm_head.weight, targets, loss_mask)
        logits = self.lm_head(h)  # [B, T, V]
        return logits, self.loss(logits, targets, loss_mask)

    @staticmethod
    def loss(logits, targets, loss_mask=None):
        """Mean next-token cross-entropy over the counted positions (float32 math)."""
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="none")
        counted = reference.loss_weights(targets, loss_mask)
        return (per_token * counted).sum() / counted.sum().clamp(min=1.0)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (a tied head counted once); without the position table by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - sum(p.numel() for p in self.transformer.wpe.parameters()) if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N for the matmuls plus 12·L·C·T for
        attention's QKᵀ and PV (PaLM's accounting, no causal discount; C = nh·hd when they differ)."""
        c, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * T
