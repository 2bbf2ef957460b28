"""Generation: a preallocated KV cache, one prefill, then one-token decode steps.

Prompts of different lengths share a batch by left padding: every row's last prompt token
sits in the same column, so each decode step writes one cache column for all rows; kv_start
tells attention where each row's real tokens begin (padding is never attended to) and
positions count from there, so a row's tokens don't depend on its neighbours.
Sampling and stop conditions live in engine.sampling.DecodeLoop (C++ when built).
"""
import collections
import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from engine.devices import autocast_for, kv_cache_dtype
from engine.errors import InputError
from engine.sampling import DecodeLoop, SamplingParams


class KVCache:
    """Keys and values of every layer: [n_layer, B, nkv, max_len, hd] (nkv: key/value heads), filled up to `pos`."""

    def __init__(self, config, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        # each layer's [B, nkv, max_len, hd] views, made once: a small decode step is bound by how
        # many ops it dispatches, and indexing self.k[layer, :, :, a:b] is four of them
        self.layers = [(self.k[i], self.v[i]) for i in range(config.n_layer)]
        self.pos = 0

    def update(self, layer: int, k, v):
        """Write this step's k, v [B, nkv, T, hd] after the cached ones; return all of them."""
        k_all, v_all = self.layers[layer]
        T = k.shape[2]
        k_all.narrow(2, self.pos, T).copy_(k)
        v_all.narrow(2, self.pos, T).copy_(v)
        return k_all.narrow(2, 0, self.pos + T), v_all.narrow(2, 0, self.pos + T)

    def advance(self, n: int):
        self.pos += n


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop_token" | "stop_string" | "length"
    seed: int
    logprobs: list[float] | None = None


def _as_ids(prompt, tokenizer) -> list[int]:
    """A string becomes [BOS] + its tokens; a list of ids is used as is."""
    if isinstance(prompt, str):
        return [tokenizer.bos_id] + tokenizer.encode(prompt)
    ids = [int(t) for t in prompt]
    if not ids:
        raise InputError("prompt must hold at least one token id")
    return ids


class PhaseTimer:
    """A `phase` hook for decode_steps that adds up the seconds spent in each phase.

        timer = PhaseTimer(sync=torch.cuda.synchronize)
        for tokens, loop in decode_steps(model, prompts, params, phase=timer): ...
        timer.seconds   # {"prefill": s, "forward": s, "sampling": s}; timer.calls counts them

    What the phases leave out of the wall-clock time is the Python between steps. sync (e.g.
    torch.cuda.synchronize) is called at both ends of every phase, so that a phase does not
    absorb device work queued by the one before. Phases do not nest.
    """

    def __init__(self, sync=None):
        self.sync = sync
        self.seconds = collections.Counter()
        self.calls = collections.Counter()

    def __call__(self, name: str) -> "PhaseTimer":
        self._name = name
        return self

    def __enter__(self):
        if self.sync:
            self.sync()
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.sync:
            self.sync()
        self.seconds[self._name] += time.perf_counter() - self._t0
        self.calls[self._name] += 1


_NO_PHASE = contextlib.nullcontext()  # what every phase enters when no hook is given (re-enterable, free)


@torch.inference_mode()
def decode_steps(model, prompts: list[list[int]], params: list[SamplingParams], token_bytes=None, sampler="auto",
                 phase=None) -> Iterator[tuple[torch.Tensor, DecodeLoop]]:
    """Yield (tokens [B], loop) after every step; tokens[b] == -1 once row b has finished.

    phase: an optional hook for profilers and benchmarks, entered as `with phase(name):` around
    each part of the work: "prefill" (the prompts' forward, once), then per step "sampling"
    (DecodeLoop.step, with the logits' copy to the CPU) and "forward" (one token's forward).
    PhaseTimer adds up their seconds; engine.profile names them in a trace.
    """
    if len(params) != len(prompts):
        raise InputError(f"params has {len(params)} entries for {len(prompts)} prompts")
    if not prompts or not all(prompts):
        raise InputError("prompts must be a non-empty list of non-empty token-id lists")
    phase = phase or (lambda name: _NO_PHASE)
    cfg = model.config
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    L = max(lengths)
    total = L + max(p.max_new_tokens for p in params)
    if total > cfg.block_size:
        raise InputError(f"prompt ({L} tokens) + max_new_tokens ({total - L}) exceeds the model's context of "
                         f"{cfg.block_size} tokens")
    idx = torch.zeros(len(prompts), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, L - len(p) :] = torch.tensor(p)
    kv_start = torch.tensor([L - n for n in lengths], device=device) if min(lengths) < L else None
    cache = KVCache(cfg, len(prompts), total, device, kv_cache_dtype(model))
    loop = DecodeLoop(params, prompts, token_bytes=token_bytes, impl=sampler)
    model.eval()
    if device.type == "cpu":  # cuBLAS takes either weight layout at full speed; the CPU GEMM does not
        model.decode_layout()
    autocast = autocast_for(device)
    with phase("prefill"), autocast:
        logits, _ = model(idx.to(device), cache=cache, kv_start=kv_start, last_only=True)
    while True:
        with phase("sampling"):
            tokens = loop.step(logits[:, -1])
        yield tokens, loop
        if loop.all_finished:
            return
        with phase("forward"), autocast:
            logits, _ = model(loop.next_input.to(device), cache=cache, kv_start=kv_start)


def _finish_text(tokenizer, ids: list[int], params: SamplingParams, reason: str) -> str:
    """Decoded reply without the stop token and cut before a matched stop string."""
    if reason == "stop_token":
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    if reason == "stop_string":
        cut = min((i for s in params.stop if (i := text.find(s)) >= 0), default=len(text))
        text = text[:cut]
    return text


def generate(model, tokenizer, prompts, params: SamplingParams | list[SamplingParams] | None = None, sampler="auto") -> list[Completion]:
    """Complete a batch of prompts (strings or token-id lists), each with its own params."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = [_as_ids(p, tokenizer) for p in prompts]
    params = params or SamplingParams()
    params = [params] * len(ids) if isinstance(params, SamplingParams) else list(params)
    token_bytes = tokenizer.token_bytes() if any(p.stop for p in params) else None
    for _, loop in decode_steps(model, ids, params, token_bytes, sampler):
        pass
    return [
        Completion(
            text=_finish_text(tokenizer, loop.generated[b], params[b], loop.finish_reason[b]),
            token_ids=loop.generated[b],
            finish_reason=loop.finish_reason[b],
            seed=loop.seeds[b],
            logprobs=loop.logprobs[b] if params[b].logprobs else None,
        )
        for b in range(len(ids))
    ]


def stream(model, tokenizer, prompt, params: SamplingParams | None = None, sampler="auto") -> Iterator[str]:
    """Yield the reply of one prompt as text pieces, as soon as they are whole characters.
    With stop strings, text that could still become a stop string is held back."""
    params = params or SamplingParams()
    ids = _as_ids(prompt, tokenizer)
    token_bytes = tokenizer.token_bytes() if params.stop else None
    hold = max((len(s) for s in params.stop), default=1) - 1
    sent = 0
    for _, loop in decode_steps(model, [ids], [params], token_bytes, sampler):
        if loop.all_finished:
            text = _finish_text(tokenizer, loop.generated[0], params, loop.finish_reason[0])
            if len(text) > sent:
                yield text[sent:]
            return
        text = tokenizer.decode(loop.generated[0])
        ready = len(text) - hold
        while ready > sent and text[ready - 1] == "\ufffd":  # a character still missing bytes
            ready -= 1
        if ready > sent:
            yield text[sent:ready]
            sent = ready
