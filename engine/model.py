"""GPT-2, top-down: GPT -> Block -> (CausalSelfAttention, MLP).

Weights are plain nn.Linear / nn.Embedding / LayerNorm parameters with nanoGPT's names, so a
state_dict is the same whatever backend runs it. Every op with a fast path (attention,
LayerNorm, residual-add + LayerNorm) comes from the backend (engine/backends.py); the model
never branches on the backend's name. The residual stream is called `stream`; a sublayer's
output on its way to being added to it is the `branch`.

Shapes: B batch, T sequence, C n_embd, nh heads, hd head dim, V vocab.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.backends import get_backend, resolve_name
from engine.config import GPTConfig


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.layer_idx, self.dropout = config.n_head, layer_idx, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, ops, cache=None, kv_start=None):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, nh, T, hd]
        if cache is not None:  # append this step's keys/values, attend over everything cached so far
            k, v = cache.update(self.layer_idx, k, v)  # [B, nh, cache.pos + T, hd]
        y = ops.attention(q, k, v, causal=True, kv_start=kv_start)  # [B, nh, T, hd]
        y = y.transpose(1, 2).reshape(B, T, C)
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.dropout = config.dropout
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        x = F.gelu(self.c_fc(x), approximate="tanh")
        return F.dropout(self.c_proj(x), self.dropout, self.training)


class Block(nn.Module):
    """Pre-LayerNorm block. A block hands the next one the residual stream and its MLP's output
    (the branch) still apart: the next LayerNorm adds them in the same pass that normalises."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, stream, branch, ops, cache=None, kv_start=None):
        """stream: the residual stream [B, T, C]; branch: the previous block's MLP output, not yet
        added to it (None in the first block). Returns (stream, this block's MLP output)."""
        h, stream = self.ln_1.add_then_norm(stream, branch, ops)
        branch = self.attn(h, ops, cache, kv_start)
        h, stream = self.ln_2.add_then_norm(stream, branch, ops)
        return stream, self.mlp(h)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=LayerNorm(config.n_embd, config.bias, config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
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
        """Grow the (tied) token table to vocab_size; new rows get GPT-2's init. For adding tokens."""
        old = self.transformer.wte.weight
        if vocab_size < old.shape[0]:
            raise ValueError(f"resize_vocab only grows the vocabulary: {old.shape[0]} -> {vocab_size}")
        wte = nn.Embedding(vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
        nn.init.normal_(wte.weight, mean=0.0, std=0.02)
        with torch.no_grad():
            wte.weight[: old.shape[0]] = old
        self.transformer.wte = wte
        self.lm_head = nn.Linear(old.shape[1], vocab_size, bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = wte.weight
        self.config.vocab_size = vocab_size
        return self

    def ops_for(self, device: torch.device):
        name = resolve_name(self.backend, device)
        if name not in self._ops:
            self._ops[name] = get_backend(name, device)
        return self._ops[name]

    def forward(self, idx, targets=None, loss_mask=None, cache=None, kv_start=None, last_only=False):
        """idx: [B, T] token ids. Returns (logits [B, T, V] (or [B, 1, V] with last_only), loss).

        targets: [B, T] next-token ids (-1 = ignore); loss_mask: [B, T], 1 where a target counts.
        cache: a KV cache (engine.generate.KVCache) to append to; kv_start: LongTensor[B], the
        first real position of each left-padded row (positions count from there).
        """
        B, T = idx.shape
        offset = cache.pos if cache is not None else 0
        if offset + T > self.config.block_size:
            raise ValueError(f"sequence length {offset + T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(offset, offset + T, device=idx.device)[None]  # [1, T]
        if kv_start is not None:
            pos = (pos - kv_start[:, None]).clamp(min=0)  # [B, T]
        ops = self.ops_for(idx.device)
        stream = F.dropout(self.transformer.wte(idx) + self.transformer.wpe(pos), self.config.dropout, self.training)
        branch = None
        for block in self.transformer.h:
            stream, branch = block(stream, branch, ops, cache, kv_start)
        h, _ = self.transformer.ln_f.add_then_norm(stream, branch, ops)  # [B, T, C]
        if cache is not None:
            cache.advance(T)
        if targets is None:
            return self.lm_head(h[:, -1:] if last_only else h), None
        logits = self.lm_head(h)  # [B, T, V]
        return logits, self.loss(logits, targets, loss_mask)

    @staticmethod
    def loss(logits, targets, loss_mask=None):
        """Mean next-token cross-entropy over the counted positions (float32 math)."""
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="none")
        counted = (targets.flatten() != -1).float()
        if loss_mask is not None:
            counted = counted * loss_mask.flatten().float()
        return (per_token * counted).sum() / counted.sum().clamp(min=1.0)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; without the position table by default (the token table is the tied head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N for the matmuls plus 12·L·C·T for
        attention's QKᵀ and PV (PaLM's accounting, no causal discount)."""
        T = seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * T
