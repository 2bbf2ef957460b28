"""The decode loop's draw on the device: kernels.sampling with its per-request state held there.

engine.sampling.DecodeLoop (C++) drives generation: stop tokens, stop strings, max_new_tokens,
the generated lists, streaming. On a GPU the draw itself belongs where the logits are, so that
only the B chosen ids (and log-probs) cross to the host and a CUDA graph can hold the step.
DeviceSampler is that draw for one batch, made once per generate call. It holds on the logits'
device what the kernel reads per row: the parameters (row_params), the logit-bias table, the
RNG positions and the token counts the penalties need, counted from the prompts as the C++
sampler counts them (rows with penalties only). step() launches the kernel, which adds the
chosen tokens to the counts in place, and advances the positions in place: it never waits for
the device.

Every row is drawn at every step, finished or not: decode_steps keeps all B rows in the batch
(a finished row reads a valid id and its result is dropped), so the shapes never change, and the
state of a finished row is never read again. Same tokens and log-probs as DecodeLoop for the rows
still running, away from the top-p / min-p rounding boundaries kernels/sampling.py describes
(tests/test_device_sampling.py drives both over the same logits, and replays the step from a CUDA
graph on a GPU).
"""
import torch

from engine.errors import InputError
from engine.sampling import SamplingParams, _check_bias, _check_tokens


class DeviceSampler:
    """params[b], prompts[b]: row b's request and prompt ids; seeds[b]: its resolved seed (a
    DecodeLoop's `seeds`, so both draw with the same one); vocab_size: V of the logits."""

    def __init__(self, params, prompts, seeds, vocab_size: int, device):
        from kernels import sampling as kernel  # engine imports kernels only where it runs them (DESIGN.md)

        params, prompts, seeds = list(params), [list(p) for p in prompts], list(seeds)
        if not len(params) == len(prompts) == len(seeds):
            raise InputError(f"params, prompts and seeds must have the same length, got {len(params)}, {len(prompts)} "
                             f"and {len(seeds)}")
        for b, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise InputError(f"params[{b}] must be a SamplingParams, got {type(p).__name__}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise InputError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        V = vocab_size
        _check_bias(V, params)
        _check_tokens(V, prompts)
        self._kernel, self.vocab_size = kernel, V
        B = len(params)

        def column(field, dtype=torch.float64):
            return torch.tensor([getattr(p, field) for p in params], dtype=dtype)

        seeds = torch.tensor([s - (1 << 64) if s >= 1 << 63 else s for s in seeds], dtype=torch.int64)  # uint64 bits
        penalized = [p.penalized for p in params]
        penalties = ((column("repetition_penalty"), column("presence_penalty"), column("frequency_penalty"))
                     if any(penalized) else ())
        host = kernel.row_params(V, column("temperature"), column("top_k", torch.int64), column("top_p"),
                                 column("min_p"), seeds, *penalties)
        self.params = kernel.RowParams(*(None if t is None else t.to(device) for t in host))
        self.positions = torch.tensor([len(p) for p in prompts], dtype=torch.int64).to(device)  # of the token drawn next
        self.counts = None  # [B, V] int32: prompt + generated, for the penalties
        if any(penalized):
            counts = torch.zeros(B, V, dtype=torch.int32)
            for b, prompt in enumerate(prompts):
                if penalized[b]:
                    counts[b].index_add_(0, torch.tensor(prompt, dtype=torch.int64),
                                         torch.ones(len(prompt), dtype=torch.int32))
            self.counts = counts.to(device)
        self.bias = None  # [B, V] float64
        if any(p.logit_bias for p in params):
            bias = torch.zeros(B, V, dtype=torch.float64)
            for b, p in enumerate(params):
                for tok, add in (p.logit_bias or {}).items():
                    bias[b, tok] = add
            self.bias = bias.to(device)
        asked = torch.tensor([p.logprobs for p in params])
        self._logprobs = bool(asked.any())
        self._not_asked = (~asked).to(device)

    def state(self) -> list[torch.Tensor]:
        """Every tensor the draw reads or updates, in a fixed order. A captured step holds these: a new
        batch of the same size and features (penalties, bias, log-probs) is loaded by copying another
        sampler's state into them."""
        return [t for t in (*self.params, self.positions, self.counts, self.bias, self._not_asked) if t is not None]

    def step(self, logits: torch.Tensor):
        """(tokens [B] int64, log-probs [B] float64 or None when no row asked for them; NaN in the
        rows that did not), on the logits' device. logits: [B, V]. A token < 0 marks a row whose
        logits cannot be sampled (check() says which and why)."""
        if logits.dim() != 2 or logits.shape != (len(self.positions), self.vocab_size):
            raise InputError(f"logits must be [B={len(self.positions)}, V={self.vocab_size}], got {tuple(logits.shape)}")
        out = self._kernel.sample(logits, self.params, self.positions, self.counts, self.bias, logprobs=self._logprobs)
        self.positions += 1
        if not self._logprobs:
            return out, None
        tokens, logprobs = out
        return tokens, logprobs.masked_fill_(self._not_asked, float("nan"))

    def check(self, tokens, running) -> None:
        """Raise the C++ sampler's ValueError for the first of the `running` rows (ids) whose token
        (tokens: the step's, on the host) marks bad logits."""
        for b in running:
            if tokens[b] == self._kernel.NAN_OR_INF:
                raise ValueError(f"logits row {b} contains NaN or +inf")
            if tokens[b] == self._kernel.ALL_MASKED:
                raise ValueError(f"logits row {b} is -inf everywhere (after logit bias): nothing can be sampled")
