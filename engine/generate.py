"""Generation: a preallocated KV cache, one prefill, then one-token decode steps.

Prompts of different lengths share a batch by left padding: every row's last prompt token
sits in the same column, so each decode step writes one cache column for all rows; kv_start
tells attention where each row's real tokens begin (padding is never attended to) and
positions count from there, so a row's tokens don't depend on its neighbours.
Sampling and stop conditions live in engine.sampling.DecodeLoop (C++ when built).
"""
import collections
import contextlib
import sys
import time
import types
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from engine.devices import advise_huge_pages, autocast_for, kv_cache_dtype
from engine.errors import InputError
from engine.sampling import DecodeLoop, SamplingParams


class KVCache:
    """Keys and values of every layer: [n_layer, B, nkv, max_len, hd] (nkv: key/value heads), filled up to `pos`.

    Eager decode keeps `pos` a Python int and attention reads the filled part, k[:, :, :pos].
    `make_static()` (compiled / CUDA-graph decode) turns `pos` into a LongTensor[1] on the device that
    the forward advances in place, and attention reads the whole cache with per-row valid lengths
    (kv_lens): every step then has the same shapes and nothing in it waits for the host.
    """

    def __init__(self, config, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        for t in (self.k, self.v):  # 2 MB pages on the CPU: every decode step streams the whole cache
            advise_huge_pages(t)
        # each layer's [B, nkv, max_len, hd] views, made once: a small decode step is bound by how
        # many ops it dispatches, and indexing self.k[layer, :, :, a:b] is four of them
        self.layers = [(self.k[i], self.v[i]) for i in range(config.n_layer)]
        self.pos = 0
        self.static = False
        self._static_pos = None

    def make_static(self) -> "KVCache":
        # attention now reads the unfilled columns too, with weight 0, and 0 · NaN (torch.empty's garbage) is NaN
        self.k[..., self.pos :, :].zero_()
        self.v[..., self.pos :, :].zero_()
        if self._static_pos is None:
            self._static_pos = torch.tensor([self.pos], device=self.k.device)
        else:  # the same tensor again: a CUDA graph captured over this cache reads it
            self._static_pos.fill_(self.pos)
        self.pos, self.static = self._static_pos, True
        return self

    def reset(self) -> "KVCache":
        """Empty and growing again, for a new prefill into the same buffers (a bucket of compile=True)."""
        self.pos, self.static = 0, False
        return self

    def positions(self, T: int):
        """The cache columns [1, T] that T new tokens go to (their absolute positions). The model
        asks once per forward; a static cache also works out then what every layer's attention reads,
        each row's valid length after this forward (kv_lens [B])."""
        if self.static:
            self.kv_lens = (self.pos + T).expand(self.k.shape[1]).contiguous()
            return (self.pos + torch.arange(T, device=self.pos.device))[None]
        return torch.arange(self.pos, self.pos + T, device=self.k.device)[None]

    def attend(self, layer: int, q, k, v, positions, kv_start, ops):
        """Write this step's k, v [B, nkv, T, hd] at columns positions [1, T] (from `positions`) and
        attend with q [B, nh, T, hd] over the cache -> [B, nh, T, hd]. Eager: over the filled part,
        as one backend op (ops.attention_with_cache); static: over the whole cache, with every
        row's valid length (kv_lens)."""
        k_all, v_all = self.layers[layer]
        if self.static:
            k_all.index_copy_(2, positions[0], k)
            v_all.index_copy_(2, positions[0], v)
            return ops.attention(q, k_all, v_all, causal=True, kv_start=kv_start, kv_lens=self.kv_lens)
        return ops.attention_with_cache(q, k, v, k_all, v_all, self.pos, kv_start)

    def advance(self, n: int):
        self.pos += n  # in place when static (a captured step replays it)


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


def decode_steps(model, prompts: list[list[int]], params: list[SamplingParams], token_bytes=None, sampler="auto",
                 phase=None, compile=False) -> Iterator[tuple[torch.Tensor, DecodeLoop]]:
    """Yield (tokens [B], loop) after every step; tokens[b] == -1 once row b has finished. tokens
    may be the loop's own buffer, overwritten by the next step: clone it to keep it.

    compile=True: the decode steps run on a static cache (KVCache.make_static: the same shapes every
    step). On a GPU the prefill runs compiled (torch.compile, once per model: _compiled_prefill),
    the draw runs there too (engine.device_sampling) and each step, forward and draw, is one replay
    of a CUDA graph (_graphed_decode); on the CPU everything runs eagerly (a warning says so once).
    Same tokens as compile=False.

    phase: an optional hook for profilers and benchmarks, entered as `with phase(name):` around
    each part of the work: "prefill" (the prompts' forward, once), then per step "sampling"
    (DecodeLoop.step, with the logits' copy to the CPU) and "forward" (one token's forward).
    PhaseTimer adds up their seconds; engine.profile names them in a trace.

    The model runs in inference mode, entered around each forward, not around the whole generator
    (@torch.inference_mode on a generator re-enters it at every step: ~9 us of Python a step in a
    cold cache, 6% of a batch-1 step of the tiny model; the C++ decode step needs no mode at all).
    On the CPU the model's Linear weights are left input-major (GPT.decode_layout: the same values,
    shapes and state_dict; once, later calls find them so): the CPU GEMM multiplies them faster.
    """
    if len(params) != len(prompts):
        raise InputError(f"params has {len(params)} entries for {len(prompts)} prompts")
    if not prompts or not all(prompts):
        raise InputError("prompts must be a non-empty list of non-empty token-id lists")
    phase = phase or (lambda name: _NO_PHASE)
    cfg = model.config
    device = next(model.parameters()).device
    L = max(len(p) for p in prompts)
    total = L + max(p.max_new_tokens for p in params)
    if total > cfg.block_size:
        raise InputError(f"prompt ({L} tokens) + max_new_tokens ({total - L}) exceeds the model's context of "
                         f"{cfg.block_size} tokens")
    loop = DecodeLoop(params, prompts, token_bytes=token_bytes, impl=sampler)
    model.eval()
    if compile and device.type == "cuda":
        yield from _graphed_decode(model, prompts, params, loop, total, phase)
        return
    autocast = autocast_for(device)
    with torch.inference_mode():
        idx, kv_start = _padded_batch(prompts, device)
        cache = KVCache(cfg, len(prompts), total, device, kv_cache_dtype(model))
        if device.type == "cpu":  # cuBLAS takes either weight layout at full speed; the CPU GEMM does not
            model.decode_layout()
        with phase("prefill"), autocast:
            logits, _ = model(idx, cache=cache, kv_start=kv_start, last_only=True)
        if compile:
            cache.make_static()
            warnings.warn("compile=True: the compiled prefill and CUDA-graph decode need a GPU; on the CPU the prefill "
                          "and the static-shape decode steps run eagerly", RuntimeWarning, stacklevel=2)
        with autocast:  # the backend's own decode step where it has one (the torch backend's C++ step on the CPU)
            forward = model.ops_for(device).decoder(model, cache, kv_start)

    def model_forward(tokens):
        with torch.inference_mode(), autocast:
            return model(tokens.to(device), cache=cache, kv_start=kv_start)[0][:, -1]

    forward = forward or model_forward
    with phase("sampling"):
        tokens = loop.step(logits[:, -1], copy=False)  # (checks the logits in full)
    sample = None
    while True:
        yield tokens, loop
        if loop.all_finished:
            return
        with phase("forward"):
            logits = forward(loop.next_input)
        sample = sample or loop.stepper(logits)  # the forward's logits are all of one kind
        with phase("sampling"):
            tokens = sample(logits)


_PREFILL_BACKEND = "inductor"  # torch.compile's backend for compile=True's prefill (tests count its graphs)


def _compiled_prefill(model):
    """The model's forward under torch.compile (dynamic shapes) for compile=True's prefill on a GPU,
    made once per model: one compile serves every prompt length and batch size (batch 1 and the
    presence of kv_start specialise once each). It traces whole (tests/test_generate.py counts its
    graphs), but is not compiled with fullgraph=True: past torch's recompile limit (8 per code
    object and process: other models, configs, architectures) that raises, where this falls back to
    eager. Kept in the model's __dict__, not as a submodule: the state_dict does not change."""
    compiled = model.__dict__.get("_compiled_prefill")
    if compiled is None:
        # one eager token first: the model fills its lazy caches (backend ops, RoPE tables), each of
        # which, filled inside the first trace, costs a second compile
        model(torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
        compiled = model.__dict__["_compiled_prefill"] = torch.compile(model.forward, dynamic=True, backend=_PREFILL_BACKEND)
    return compiled


def _padded_batch(prompts, device, zeros_kv_start=False):
    """(idx [B, L] left-padded, kv_start [B] or None when no row is padded) on device;
    zeros_kv_start: a kv_start tensor even then (a captured graph always reads one)."""
    lengths = [len(p) for p in prompts]
    L = max(lengths)
    idx = torch.zeros(len(prompts), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, L - len(p) :] = torch.tensor(p)
    padded = zeros_kv_start or min(lengths) < L
    return idx.to(device), torch.tensor([L - n for n in lengths], device=device) if padded else None


_MAX_DECODE_GRAPHS = 4  # buckets kept per model (each holds a static KV cache of its size); the oldest goes first


class _DecodeGraph:
    """compile=True's decode on a GPU for one bucket: batch and cache length rounded up to powers of two
    (the cache length at most the model's context), and which of penalties, logit bias and log-probs
    any row uses. It holds a static KV cache, the device draw (DeviceSampler) and one decode step,
    forward and draw, captured in a CUDA graph on first use; later calls that fit the bucket load
    their rows into these buffers (the batch padded with copies of row 0, greedy, dropped: up to
    twice the rows' work) and replay the same graph. Kept on the model (`_decode_graphs`): one
    generation at a time per model."""

    def __init__(self, model, batch: int, max_len: int):
        device = next(model.parameters()).device
        self.cache = KVCache(model.config, batch, max_len, device, kv_cache_dtype(model))
        self.kv_start = torch.zeros(batch, dtype=torch.long, device=device)
        self.draw = None  # the first load's DeviceSampler; later loads copy theirs into its tensors
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)  # what the captured step reads
        self.replay = None  # the captured step, made by the first call's second step

    def load(self, model, prompts, params, seeds, vocab_size: int):
        """Prefill these rows (compiled) into the cache and the draw's state; -> the prefill's logits [B, V]."""
        from engine.device_sampling import DeviceSampler

        fresh = DeviceSampler(params, prompts, seeds, vocab_size, self.kv_start.device)
        if self.draw is None:
            self.draw = fresh
        else:
            for mine, theirs in zip(self.draw.state(), fresh.state()):
                mine.copy_(theirs)
        idx, kv_start = _padded_batch(prompts, self.kv_start.device, zeros_kv_start=True)
        self.kv_start.copy_(kv_start)
        logits, _ = _compiled_prefill(model)(idx, cache=self.cache.reset(), kv_start=self.kv_start, last_only=True)
        self.cache.make_static()
        return logits[:, -1]


def _pow2(n: int) -> int:
    """The least power of two >= n."""
    return 1 << (n - 1).bit_length()


def _decode_graph(model, params, total: int) -> _DecodeGraph:
    """The model's bucket for these rows (a power-of-two batch, padded) and cache length `total`;
    made, the oldest dropped past _MAX_DECODE_GRAPHS, when missing."""
    key = (len(params), min(_pow2(total), model.config.block_size), any(p.penalized for p in params),
           any(p.logit_bias for p in params), any(p.logprobs for p in params))
    graphs = model.__dict__.setdefault("_decode_graphs", {})  # (not a submodule: the state_dict does not change)
    if key not in graphs:
        if len(graphs) >= _MAX_DECODE_GRAPHS:
            del graphs[next(iter(graphs))]
        graphs[key] = _DecodeGraph(model, key[0], key[1])
    graphs[key] = graphs.pop(key)  # the most recently used last
    return graphs[key]


@torch.inference_mode()
def _graphed_decode(model, prompts, params, loop: DecodeLoop, total: int, phase):
    """decode_steps' steps with compile=True on a GPU: the prefill runs compiled, the draw runs on the
    device (DeviceSampler, same tokens as the loop's own sampler) and each decode step, forward and
    draw, is one replay of the bucket's CUDA graph (_DecodeGraph) over its static cache; only the
    chosen ids (and log-probs) come to the host, where the loop appends its B rows' (stops,
    streaming). Phases: "prefill"; "sampling" is the draw's trip to the host and the loop's
    bookkeeping; "forward" the replay."""
    B = len(prompts)
    with phase("prefill"), autocast_for(model.lm_head.weight.device):
        vocab_size = model.lm_head.weight.shape[0]
        size = _pow2(B)
        rows_prompts = prompts + [prompts[0]] * (size - B)
        rows_params = params + [SamplingParams(temperature=0.0, max_new_tokens=1)] * (size - B)
        rows_seeds = loop.seeds + [0] * (size - B)
        bucket = _decode_graph(model, rows_params, total)
        logits = bucket.load(model, rows_prompts, rows_params, rows_seeds, vocab_size)
    draw = bucket.draw

    def append(ids, logprobs):
        host = ids[:B].cpu()  # the step's one synchronisation
        draw.check(host.tolist(), loop.running)
        return loop.append(host, None if logprobs is None else logprobs[:B].cpu())

    with phase("sampling"):
        ids, logprobs = draw.step(logits)  # (the first draw also compiles the sampling kernel)
        tokens = append(ids, logprobs)
    yield tokens, loop
    if loop.all_finished:
        return
    bucket.tokens.copy_(ids.view(-1, 1))
    if bucket.replay is None:
        bucket.replay = _capture_decode_step(model, bucket.cache, bucket.kv_start, draw, bucket.tokens)
    while True:
        with phase("forward"):
            ids, logprobs = bucket.replay()
        with phase("sampling"):
            tokens = append(ids, logprobs)
        yield tokens, loop
        if loop.all_finished:
            return


def _capture_decode_step(model, cache: KVCache, kv_start, draw, tokens):
    """One decode step, forward and draw, captured in a CUDA graph that reads its tokens from `tokens`
    [B, 1] and writes the draw's back there: replay() -> (ids [B], logprobs [B] or None), on the
    device. cache.pos and the draw's state advance inside the graph."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)  # no cast cache outlives a capture
    start = cache.pos.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), autocast:  # warm-up: kernels compile and cuBLAS sets up outside the capture
        for _ in range(2):
            model(tokens, cache=cache, kv_start=kv_start)
    torch.cuda.current_stream().wait_stream(side)
    cache.pos.copy_(start)  # the warm-up's cache writes lie past `start`: the real steps overwrite them
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast:
        logits, _ = model(tokens, cache=cache, kv_start=kv_start)
        ids, logprobs = draw.step(logits[:, -1])
        tokens.copy_(ids.view(-1, 1))

    def replay():
        graph.replay()
        return ids, logprobs

    return replay


def _finish_text(tokenizer, ids: list[int], params: SamplingParams, reason: str) -> str:
    """Decoded reply without the stop token and cut before a matched stop string."""
    if reason == "stop_token":
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    if reason == "stop_string":
        cut = min((i for s in params.stop if (i := text.find(s)) >= 0), default=len(text))
        text = text[:cut]
    return text


def generate(model, tokenizer, prompts, params: SamplingParams | list[SamplingParams] | None = None, sampler="auto",
             compile=False) -> list[Completion]:
    """Complete a batch of prompts (strings or token-id lists), each with its own params.
    compile: decode from a CUDA graph on a GPU (decode_steps)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = [_as_ids(p, tokenizer) for p in prompts]
    params = params or SamplingParams()
    params = [params] * len(ids) if isinstance(params, SamplingParams) else list(params)
    token_bytes = tokenizer.token_bytes() if any(p.stop for p in params) else None
    for _, loop in decode_steps(model, ids, params, token_bytes, sampler, compile=compile):
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


def stream(model, tokenizer, prompt, params: SamplingParams | None = None, sampler="auto", compile=False) -> Iterator[str]:
    """Yield the reply of one prompt as text pieces, as soon as they are whole characters.
    With stop strings, text that could still become a stop string is held back."""
    params = params or SamplingParams()
    ids = _as_ids(prompt, tokenizer)
    token_bytes = tokenizer.token_bytes() if params.stop else None
    hold = max((len(s) for s in params.stop), default=1) - 1
    sent = 0
    for _, loop in decode_steps(model, [ids], [params], token_bytes, sampler, compile=compile):
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


class _CallableModule(types.ModuleType):
    """This module, callable as its `generate`: DESIGN.md's `engine.generate(...)` (engine/__init__.py says why)."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
