"""Token sampling: SamplingParams, the reference sampler, and the C++ sampler's Python face.

One documented order, applied per row of a [B, V] float32 logits batch (DESIGN.md "Sampling"):

    penalties -> logit bias -> temperature -> top-k -> top-p -> min-p -> draw

The decisions this module (and csrc/sampler.cpp, which must agree with it token for token) make:

Precision. The float32 logits are widened to float64 (exact) and every stage runs in float64
with plain IEEE operations in the same order in both implementations, so penalties, bias and
temperature give bit-identical values in Python and C++ (the extension is built with
-ffp-contract=off so no fused multiply-add changes a rounding).
  * repetition (CTRL / Hugging Face), for every token seen at least once in prompt + generated:
    x = x / r if x > 0 else x * r
  * presence / frequency (OpenAI), same tokens, count = occurrences:
    x = x - (presence + frequency * count)
  * logit bias: x = x + bias[token]  (a bias of -inf bans a token)
  * a row whose maximum is -inf after the bias raises ValueError; so do NaN and +inf logits
    (checked on the input row; a +inf logit does not define a distribution). Logits come from
    the model, so these are plain ValueErrors; bad arguments (parameters, token ids, shapes)
    raise engine.errors.InputError, in both implementations.

Temperature 0 is greedy: argmax of x, ties to the lowest id; top-k / top-p / min-p are ignored.

Ranking. Top-k and top-p rank tokens by x descending, then token id ascending. Temperature is
a positive scale, so this is the ranking of the tempered logits; ranking before the division
keeps rounding (huge temperatures) from creating ties that were not there.
  * top-k keeps exactly min(k, V) tokens (top_k=0: off).
  * weights w_i = exp((x_i - x_max) / T) (the top token has w = 1); probabilities are w / sum(w)
    over the current survivors.
  * top-p (on the top-k survivors): the shortest prefix of the ranking whose cumulative weight,
    summed in ranking order, is >= top_p * (sum of the survivors' weights); top_p = 1 is off.
  * min-p: keep w_i >= min_p (i.e. p_i >= min_p * p_max; renormalisation after top-p does not
    change the ratio). As w does not increase along the ranking, this is again a prefix.

The draw is the Gumbel-max trick, which needs no cumulative sum: the chosen token is
argmax over survivors of (x_i - x_max) / T + g_i, ties to the lowest id, with
g_i = -log(-log u_i) in float64 and u_i from a counter-based generator:
    k   = mix64(mix64(seed + G) ^ position)          # G = 0x9E3779B97F4A7C15, arithmetic mod 2^64
    h_i = mix64(k + (i + 1) * G)                    # the i+1-th output of a splitmix64 stream
    u_i = ((h_i >> 11) + 0.5) * 2^-53               # 53 bits, strictly inside (0, 1)
with mix64 the splitmix64 finaliser. `position` is the sequence position of the token being
drawn (prompt length + tokens generated so far), so a seeded request draws the same tokens
whatever shares its batch and however it is padded. The C++ sampler uses the same formulas;
the two can only disagree where exp/log of libm and of torch differ in the last bit AND that
bit decides a comparison (a near-tie at the 1e-16 level), which random inputs never hit.

Log-probabilities (logprobs=True) are log_softmax over the whole vocabulary of the processed
logits (after penalties, bias and temperature, BEFORE the top-k / top-p / min-p filtering),
taken at the chosen token: (x_c - x_max) / T - log(sum_i exp((x_i - x_max) / T)). For
temperature 0 the temperature is taken as 1.

Seeds: seed=None draws a fresh 64-bit seed per request from the OS (`secrets`), not from
torch's global generator (whose default seed is the same in every process); DecodeLoop.seeds
records them, so any run can be replayed.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
import numbers
import secrets
import types
import warnings
from collections import Counter
from collections.abc import Callable, Mapping

import numpy as np
import torch

from engine import native
from engine.errors import InputError

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (2^64 / golden ratio, odd)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_INT_LIMIT = 1 << 62  # exclusive bound of top_k, max_new_tokens and token ids: int64_t in C++, with room for sums


class Finish(enum.IntEnum):
    """Why a row stopped: the code a decode-loop core returns for it after each step.
    csrc/sampler.cpp exports the same enum as engine._sampler.Finish (a test checks they agree);
    DecodeLoop.finish_reason holds the lower-case name ("stop_token", ...)."""

    RUNNING = 0
    STOP_TOKEN = 1
    STOP_STRING = 2
    LENGTH = 3


# ----------------------------------------------------------------------------- parameters


def _check_real(name, value, ok, allowed):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or not ok(value):
        raise InputError(f"SamplingParams.{name} must be {allowed}, got {value!r}")
    return float(value)


def _check_int(name, value, lo, hi, allowed):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value < hi:
        raise InputError(f"SamplingParams.{name} must be {allowed}, got {value!r}")
    return int(value)


_REAL_FIELDS = {  # field: (accepts, what the error message says is expected)
    "temperature": (lambda v: 0 <= v < math.inf, "finite and >= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: 0 < v < math.inf, "finite and > 0"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token of one request; every field is validated on construction."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = dataclasses.field(default=None, hash=False)
    seed: int | None = None
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: bool = False

    @property
    def penalized(self) -> bool:
        """Whether a repetition, presence or frequency penalty is on (the draw then counts tokens)."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def __post_init__(self):
        fix = {name: _check_real(name, getattr(self, name), ok, allowed) for name, (ok, allowed) in _REAL_FIELDS.items()}
        fix["top_k"] = _check_int("top_k", self.top_k, 0, _INT_LIMIT, "an int >= 0 (0 = off)")
        fix["max_new_tokens"] = _check_int("max_new_tokens", self.max_new_tokens, 1, _INT_LIMIT, "an int >= 1")
        if self.seed is not None:
            fix["seed"] = _check_int("seed", self.seed, 0, 1 << 64, "None or an int in [0, 2**64)")
        if not isinstance(self.logprobs, bool):
            raise InputError(f"SamplingParams.logprobs must be a bool, got {self.logprobs!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise InputError(f"SamplingParams.logit_bias must be None or a dict token id -> float, got {self.logit_bias!r}")
            bias = {}
            for tok, val in self.logit_bias.items():
                tok = _check_int("logit_bias", tok, 0, _INT_LIMIT, "keyed by token ids >= 0")
                bias[tok] = _check_real(f"logit_bias[{tok}]", val, lambda v: v < math.inf, "a float, finite or -inf")
            fix["logit_bias"] = types.MappingProxyType(bias)
        stop_ids = self.stop_token_ids
        stop_ids = (stop_ids,) if isinstance(stop_ids, numbers.Integral) else tuple(stop_ids)
        fix["stop_token_ids"] = tuple(_check_int("stop_token_ids", t, 0, _INT_LIMIT, "token ids >= 0") for t in stop_ids)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InputError(f"SamplingParams.stop must hold non-empty strings, got {s!r}")
        fix["stop"] = stop
        for name, value in fix.items():
            object.__setattr__(self, name, value)


def _resolve_seed(p: SamplingParams) -> int:
    return secrets.randbits(64) if p.seed is None else p.seed


# ----------------------------------------------------------------------------- the RNG


def _mix64(z: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2^64)."""
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _signed(c: int) -> int:
    """The int64 with the same bits as the uint64 c (torch has no uint64 shifts)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _mix64_tensor(z: torch.Tensor) -> torch.Tensor:
    """_mix64 on an int64 tensor: multiplication wraps like uint64; shifts are made logical by a mask."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _signed(_MIX1)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _signed(_MIX2)
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def stream_key(seed: int, position: int) -> int:
    """The per-(seed, position) splitmix64 state; C++ computes the same value."""
    return _mix64(_mix64((seed + _GAMMA) & _MASK64) ^ position)


def uniforms(seed: int, position: int, token_ids: torch.Tensor) -> torch.Tensor:
    """u in (0, 1), float64, one per token id: the counter-based draw documented above."""
    z = _signed(stream_key(seed, position)) + (token_ids.to(torch.int64) + 1) * _signed(_GAMMA)
    h = _mix64_tensor(z)
    return (((h >> 11) & ((1 << 53) - 1)).double() + 0.5) * 2.0**-53


# ----------------------------------------------------------------------------- reference sampler


def _check_row(row: torch.Tensor, b: int) -> None:
    if torch.isnan(row).any():
        raise ValueError(f"logits row {b} contains NaN")
    if torch.isposinf(row).any():
        raise ValueError(f"logits row {b} contains +inf")


def process_logits(row: torch.Tensor, p: SamplingParams, counts: Mapping[int, int], b: int = 0) -> torch.Tensor:
    """Penalties then logit bias, in float64: the x of the module docstring, for one row."""
    _check_row(row, b)
    x = row.to(torch.float64, copy=True)
    if counts:
        ids = torch.tensor(list(counts.keys()), dtype=torch.int64)
        n = torch.tensor(list(counts.values()), dtype=torch.float64)
        v = x[ids]
        v = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        x[ids] = v - (p.presence_penalty + p.frequency_penalty * n)
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.int64)
        x[ids] += torch.tensor(list(p.logit_bias.values()), dtype=torch.float64)
    if x.max() == -math.inf:
        raise ValueError(f"logits row {b} is -inf everywhere (after logit bias): nothing can be sampled")
    return x


def _sample_row(row, p: SamplingParams, counts, position: int, seed: int, b: int) -> tuple[int, float]:
    """(token, log-probability or NaN when not requested) for one row, the documented way."""
    x = process_logits(row, p, counts, b)
    xmax = x.max()
    t = p.temperature
    if t == 0:
        token = int(torch.argmax(x))  # first maximum = lowest id
    else:
        order = torch.sort(x, descending=True, stable=True).indices  # x desc, id asc
        if 0 < p.top_k < len(order):
            order = order[: p.top_k]
        z = (x[order] - xmax) / t
        w = torch.exp(z)
        n = len(order)
        if p.top_p < 1:
            cum = torch.cumsum(w, 0)
            n = min(int((cum < p.top_p * cum[-1]).sum()) + 1, n)
        if p.min_p > 0:
            n = int((w[:n] >= p.min_p).sum())
        keys = z[:n] - torch.log(-torch.log(uniforms(seed, position, order[:n])))
        token = int(order[:n][keys == keys.max()].min())
    logprob = math.nan
    if p.logprobs:
        scale = t if t > 0 else 1.0
        logprob = float((x[token] - xmax) / scale - torch.logsumexp((x - xmax) / scale, 0))
    return token, logprob


# ----------------------------------------------------------------------------- the C++ extension


def _extension():
    return native.extension("_sampler")


_warned_no_extension = False


def _pick_impl(impl: str) -> str:
    global _warned_no_extension
    if impl not in ("auto", "cpp", "reference"):
        raise InputError(f"impl must be 'auto', 'cpp' or 'reference', got {impl!r}")
    if impl == "cpp" and _extension() is None:
        raise InputError("impl='cpp' needs the C++ extension engine._sampler; build it with `pip install -e .`")
    if impl == "auto":
        if _extension() is not None:
            return "cpp"
        if not _warned_no_extension:
            warnings.warn("engine._sampler (the C++ sampler) is not built: using the slower reference sampler", RuntimeWarning,
                          stacklevel=3)
            _warned_no_extension = True
        return "reference"
    return impl


def _cpp_params(p: SamplingParams):
    bias = sorted(p.logit_bias.items()) if p.logit_bias else []
    return _extension().Params(
        p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
        bias, p.logprobs, list(p.stop_token_ids), [s.encode() for s in p.stop], p.max_new_tokens,
    )


_FLOAT32 = np.dtype(np.float32)  # (NumPy's built-in dtypes are singletons: `is` is the cheap test)


def _cpu_float32(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits as a contiguous float32 CPU tensor; copied (once) only when needed."""
    if logits.requires_grad:
        logits = logits.detach()
    if logits.dtype == torch.float32 and logits.is_cpu and logits.is_contiguous():
        return logits
    if out is None or out.shape != logits.shape:
        out = torch.empty(logits.shape, dtype=torch.float32, pin_memory=logits.is_cuda)
    return out.copy_(logits)


def _check_batch(logits: torch.Tensor | np.ndarray, batch: int) -> None:
    if len(logits.shape) != 2 or logits.shape[0] != batch or logits.shape[1] < 1:
        raise InputError(f"logits must be [B={batch}, V>=1], got shape {tuple(logits.shape)}")


def _check_bias(V: int, params) -> None:
    for b, p in enumerate(params):
        for tok in p.logit_bias or ():
            if tok >= V:
                raise InputError(f"SamplingParams.logit_bias of row {b} names token id {tok}, but the vocabulary has V={V} "
                                 "tokens")


def _check_tokens(V: int, token_lists) -> None:
    """Previous / prompt tokens must be ids in [0, V) (the C++ sampler checks its own copy)."""
    for b, toks in enumerate(token_lists):
        for tok in toks:
            if isinstance(tok, bool) or not isinstance(tok, numbers.Integral) or not 0 <= tok < V:
                raise InputError(f"token {tok!r} in the previous tokens of row {b} is not an id in [0, V={V})")


def _default_threads() -> int:
    return torch.get_num_threads()


# ----------------------------------------------------------------------------- stateless sampler


class Sampler:
    """Stateless: sample(logits [B, V], params [B], prev_tokens [B lists], positions [B]) -> LongTensor[B].

    impl="cpp" is the C++ extension, "reference" the PyTorch code above, "auto" the extension
    when it is built (else the reference, with a one-time warning). Both pick identical tokens.
    The extension releases the GIL and spreads rows over up to torch.get_num_threads() threads.
    Logits of any device / dtype are copied to float32 on the CPU first (no copy when they are).
    """

    def __init__(self, impl: str = "auto"):
        self.impl = _pick_impl(impl)

    def sample(self, logits, params, prev_tokens, positions) -> torch.LongTensor:
        return self.sample_with_logprobs(logits, params, prev_tokens, positions)[0]

    def sample_with_logprobs(self, logits, params, prev_tokens, positions):
        """(tokens LongTensor[B], log-probs DoubleTensor[B]; NaN for rows without logprobs=True)."""
        B = len(params)
        _check_batch(logits, B)
        if len(prev_tokens) != B or len(positions) != B:
            raise InputError(f"params, prev_tokens and positions must all have B={B} entries, got {B}, {len(prev_tokens)}, "
                             f"{len(positions)}")
        for pos in positions:
            if isinstance(pos, bool) or not isinstance(pos, numbers.Integral) or pos < 0:
                raise InputError(f"positions must be ints >= 0, got {pos!r}")
        x = _cpu_float32(logits)
        _check_bias(x.shape[1], params)
        seeds = [_resolve_seed(p) for p in params]
        if self.impl == "cpp":
            toks, lps = _extension().sample(
                x.numpy(), [_cpp_params(p) for p in params], [list(t) for t in prev_tokens],
                [int(p) for p in positions], seeds, _default_threads(),
            )
        else:
            _check_tokens(x.shape[1], prev_tokens)
            out = [_sample_row(x[b], params[b], Counter(prev_tokens[b]), int(positions[b]), seeds[b], b) for b in range(B)]
            toks, lps = ([o[0] for o in out], [o[1] for o in out]) if out else ([], [])
        return torch.tensor(toks, dtype=torch.int64), torch.tensor(lps, dtype=torch.float64)


# ----------------------------------------------------------------------------- stateful decode loop


class _ReferenceCore:
    """Per-row state in Python: token counts, stop-string tail. Mirrors the C++ DecodeLoop: the
    same buffers, stepper and record lists (generated, logprobs, finished, finish_reason, running)
    kept current by every step."""

    def __init__(self, params, prompts, token_bytes, seeds, threads, generated, logprobs, finished, finish_reason, running):
        # (threads: the C++ core's argument, unused: rows run one after another here)
        B = len(params)
        self.params, self.token_bytes, self.seeds = params, token_bytes, seeds
        self.record = generated, logprobs, finished, finish_reason, running
        self.counts = [Counter(p) for p in prompts]
        self.positions = [len(p) for p in prompts]
        self.keep = [max(map(len, p.stop), default=1) - 1 for p in params]
        self.stops = [[s.encode() for s in p.stop] for p in params]
        self.tails = [b""] * B
        self.tokens = np.full(B, -1, dtype=np.int64)
        self.next_input = np.zeros(B, dtype=np.int64)

    def stepper(self, result):
        def step(x: torch.Tensor):
            running = self.record[4]
            self._commit({b: _sample_row(x[b], self.params[b], self.counts[b], self.positions[b], self.seeds[b], b)
                          for b in running})
            return result
        return step

    def append_drawn(self, tokens: np.ndarray, logprobs: np.ndarray) -> None:
        running = self.record[4]
        if tokens.shape != (len(self.params),) or logprobs.shape != tokens.shape:
            raise InputError(f"tokens and logprobs must both be [B] = [{len(self.params)}]")
        for b in running:
            if tokens[b] < 0:
                raise InputError(f"tokens[{b}] = {tokens[b]} is not a token id")
        self._commit({b: (int(tokens[b]), float(logprobs[b])) for b in running})

    def _commit(self, out: dict) -> None:
        generated, logprobs, finished, finish_reason, running = self.record
        self.tokens[:] = -1
        for b, (tok, logprob) in out.items():  # commit only once every row sampled without error
            p = self.params[b]
            self.counts[b][tok] += 1
            self.positions[b] += 1
            generated[b].append(tok)
            if p.logprobs:
                logprobs[b].append(logprob)
            if self.stops[b]:
                tail = self.tails[b] + (self.token_bytes[tok] if tok < len(self.token_bytes) else b"")
                hit = any(s in tail for s in self.stops[b])
                self.tails[b] = tail[-self.keep[b]:] if self.keep[b] else b""
            else:
                hit = False
            reason = (Finish.STOP_TOKEN if tok in p.stop_token_ids else Finish.STOP_STRING if hit
                      else Finish.LENGTH if len(generated[b]) >= p.max_new_tokens else None)
            if reason is not None:
                finished[b], finish_reason[b] = True, reason.name.lower()
            self.tokens[b] = self.next_input[b] = tok
        running[:] = [b for b in running if not finished[b]]


class DecodeLoop:
    """Per-request sampling state for one batch; the decode loop makes one call per step.

    params[b], prompts[b]: the request of row b and its prompt token ids. token_bytes[i] is the
    bytes token i decodes to (b"" for special tokens; ids past its end count as b""); it is
    required when any request has stop strings. step(logits [B, V]) returns the chosen token of
    every row (-1 for rows finished before this step, whose state does not change) and updates
    generated / logprobs / finished / finish_reason. The RNG position of row b is
    len(prompts[b]) + len(generated[b]). next_input ([B, 1] int64, overwritten by every step) is
    what the model reads next: the step's tokens, with a valid id in place of -1.

    A step checks its arguments in full only when the logits' shape is new (the first step); the
    core samples into a token buffer it owns and keeps generated / logprobs / finished /
    finish_reason / running current itself, and stepper() skips this class's Python altogether:
    a small decode step is bound by how many Python and torch calls it makes.
    """

    def __init__(self, params, prompts, token_bytes=None, impl: str = "auto"):
        params, prompts = list(params), [list(p) for p in prompts]
        if len(params) != len(prompts):
            raise InputError(f"params and prompts must have the same length, got {len(params)} and {len(prompts)}")
        for b, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise InputError(f"params[{b}] must be a SamplingParams, got {type(p).__name__}")
        if token_bytes is None and any(p.stop for p in params):
            raise InputError("token_bytes (the bytes of every token id) is required when a request has stop strings")
        _check_tokens(_INT_LIMIT, prompts)  # ints >= 0; the bound V comes with the first step
        self.impl = _pick_impl(impl)
        self.params, self._prompts = params, prompts
        self.seeds = [_resolve_seed(p) for p in params]
        token_bytes = [bytes(t) for t in token_bytes] if token_bytes is not None else []
        # kept current by the core at every step
        self.generated, self.logprobs = [[] for _ in params], [[] for _ in params]
        self.finished, self.finish_reason = [False] * len(params), [None] * len(params)
        self._running = list(range(len(params)))
        core = _extension().DecodeLoop if self.impl == "cpp" else _ReferenceCore
        self._core = core([_cpp_params(p) for p in params] if self.impl == "cpp" else params, prompts, token_bytes,
                          self.seeds, _default_threads(), self.generated, self.logprobs, self.finished,
                          self.finish_reason, self._running)
        self._tokens = torch.from_numpy(self._core.tokens)  # the core's buffer, shared (as next_input's)
        self.next_input = torch.from_numpy(self._core.next_input).view(-1, 1)
        self._sample = self._core.stepper(self._tokens)  # returns self._tokens
        self._buf = None
        self._shape = None

    @property
    def all_finished(self) -> bool:
        return not self._running

    def _check_logits(self, logits: torch.Tensor) -> None:
        _check_batch(logits, len(self.params))
        if self._shape is not None:
            raise InputError(f"logits changed vocabulary size from V={self._shape[1]} to V={logits.shape[1]}")
        _check_bias(logits.shape[1], self.params)
        _check_tokens(logits.shape[1], self._prompts)
        self._shape = tuple(logits.shape)  # (a plain tuple compares fastest with either kind of shape)

    def step(self, logits: torch.Tensor | np.ndarray, copy: bool = True) -> torch.LongTensor:
        """logits [B, V]: a tensor, or a NumPy array (what the CPU decode step returns, engine/cpu_decode.py).
        copy=False returns the loop's own token buffer, overwritten by the next step: making a
        tensor costs a small decode step ~15-20 us, a tenth of a batch-1 step of the tiny model."""
        if logits.shape != self._shape:
            self._check_logits(logits)
        tokens = self._sample(self._core_input(logits))
        return tokens.clone() if copy else tokens

    def stepper(self, logits) -> Callable:
        """A function f(x) equal to step(x, copy=False) for logits x of the kind of these (type, dtype
        and shape; step them once first, for its checks): the C++ core's own entry where it reads
        such logits as they are (C-contiguous float32 NumPy arrays, as the CPU decode step returns),
        so that no Python runs between the caller and the core; it checks the shape, dtype and
        layout itself. (Tiny model, batch 1, in a generation: sampling 4.2 -> 1.7 us a step.)"""
        if self._core_input(logits) is logits:
            return self._sample
        return functools.partial(self.step, copy=False)

    def _core_input(self, logits):
        """logits as the core reads them: a float32 NumPy array (C++) or tensor (reference), copied
        (into a buffer kept for the next steps) only where needed."""
        if self.impl == "cpp" and isinstance(logits, np.ndarray) and logits.dtype is _FLOAT32:
            return logits  # (the C++ core checks the layout)
        if isinstance(logits, np.ndarray):
            logits = torch.from_numpy(logits)
        x = _cpu_float32(logits, self._buf)
        if x is not logits:
            self._buf = x
        return x.numpy() if self.impl == "cpp" else x

    def append(self, tokens: torch.Tensor, logprobs: torch.Tensor | None = None) -> torch.LongTensor:
        """step() with the tokens drawn elsewhere (engine.device_sampling.DeviceSampler on the GPU, from
        this loop's seeds): tokens [B] and logprobs [B] (None: none asked for) on the CPU; the
        running rows' are appended (stops, lengths, penalty counts) and returned as step() returns them."""
        tokens = tokens.to(torch.int64).numpy()
        logprobs = np.full(len(tokens), math.nan) if logprobs is None else logprobs.to(torch.float64).numpy()
        self._core.append_drawn(tokens, logprobs)
        return self._tokens.clone()

    @property
    def running(self) -> list[int]:
        """The rows not finished yet (ascending)."""
        return self._running
