"""Token sampling on the device: the C++ sampler's whole chain as one Triton kernel, same tokens.

    penalties -> logit bias -> temperature -> top-k -> top-p -> min-p -> Gumbel-max draw

A program takes ROWS rows (1 on a GPU) and walks the vocabulary in blocks, in float64 like
engine._sampler (engine/sampling.py's docstring defines each step). Where the C++ code sorts, this
kernel selects: the k-th best value by a radix select on the float64 bits (ordered as integers, 4
bits a pass, at most 16 passes, fewer once the value is pinned down), the ties at that value
settled by id with a running count, and the top-p cut the same way on the mass above a value. At
most 40 passes over a row's V values, no sort, no scratch beyond one float64 copy of the processed
rows, and no branch on a row's parameters (a greedy row is a top-k of 1, a step that is off keeps
every token): the draw stays on the device, only B ids cross to the host, and a CUDA graph can
hold it.

The draw is the counter-based Gumbel-max of engine/sampling.py: u = splitmix64(key(seed, position)
+ (token + 1) * gamma), the key -log(-log u) added to the tempered logit; the best wins, ties to the
lowest id. The top-p mass is summed in another order than the C++ loop's, so a cut within a rounding
of its threshold can differ; tests build their cases away from such boundaries.

A row reports bad logits through its token: NAN_OR_INF for NaN or +inf in the row, ALL_MASKED when
every token is -inf after the bias (the caller raises, as the C++ sampler does).
"""
import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.launch import Launch, checked_grid, kernel_op

NAN_OR_INF = -1  # the token of a row with NaN or +inf logits
ALL_MASKED = -2  # the token of a row that is -inf everywhere after the bias
_NAN_OR_INF, _ALL_MASKED = tl.constexpr(NAN_OR_INF), tl.constexpr(ALL_MASKED)  # what the kernel can read
SIGN = tl.constexpr(0x8000000000000000)
ONES = tl.constexpr(0xFFFFFFFFFFFFFFFF)  # x ^ ONES, not ~x: Triton 3.6's interpreter flips uint64 with -1
GAMMA = tl.constexpr(0x9E3779B97F4A7C15)  # splitmix64's increment
MAXNREG = 255  # the most registers a thread may have (see _launch); occupancy follows what ptxas uses


@triton.jit
def _mix64(z):
    """splitmix64's finaliser on uint64 (the multiplications wrap)."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _div(x, y, inv_y):
    """x / y rounded as IEEE division rounds it (one Newton step from x * (1/y), 1/y made on the host),
    without fp64 division: its slow-path subroutine needs a stack frame. -inf stays -inf."""
    q = x * inv_y
    exact = tl.fma(tl.fma(-q, y, x), inv_y, q)
    return tl.where(exact == exact, exact, q)


@triton.jit
def _unsigned_key(x):
    """float64 -> uint64 in the same order: negative floats flip every bit, the others the sign bit."""
    bits = x.to(tl.uint64, bitcast=True)
    return tl.where((bits & SIGN) != 0, bits ^ ONES, bits | SIGN)


@triton.jit
def _from_unsigned_key(u):
    return tl.where((u & SIGN) != 0, u ^ SIGN, u ^ ONES).to(tl.float64, bitcast=True)


@triton.jit
def _survives(x, idx, v, last_id):
    """The cut (v, last_id): x above v, or equal to it with an id up to last_id (ties go to low ids)."""
    return (x > v[:, None]) | ((x == v[:, None]) & (idx <= last_id[:, None]))


@triton.jit
def _select(x_ptr, rows_ok, xmax, t, inv_t, vk, id_k, need, V, WEIGHTED: tl.constexpr, ROWS: tl.constexpr,
            BLOCK: tl.constexpr):
    """Per row: the largest value v such that the survivors of the cut (vk, id_k) with x >= v number
    (WEIGHTED false) or weigh (true: exp((x - xmax) / t) each) at least `need`, and what of `need`
    is left for the tokens equal to v once those above it are counted. Radix select from the top
    of the order keys, 4 bits a pass; the survivors must reach `need` in all. A row is settled as
    soon as the candidates left (the survivors matching its prefix) share one key: that key is v,
    and nothing within the prefix lies above it. The passes stop when every row is settled, after
    a few digits below the exponent for distinct values rather than all 16."""
    cols = tl.arange(0, BLOCK)
    digits = tl.arange(0, 16)
    prefix = tl.zeros((ROWS,), tl.uint64)
    shift = 60 + tl.zeros((), tl.int32)  # a tensor under the interpreter too
    unsettled = ROWS + tl.zeros((), tl.int32)
    while (shift >= 0) & (unsettled > 0):  # a loop, not unrolled: 16 copies of the body took ptxas minutes
        hist = tl.zeros((ROWS, 16), tl.float64)  # the candidates, by their next digit
        lo = tl.full((ROWS,), ONES, tl.uint64)  # the least and the largest key among the candidates
        hi = tl.zeros((ROWS,), tl.uint64)
        for start in range(0, V, BLOCK):
            idx = start + cols[None, :]
            x = tl.load(x_ptr + idx, mask=rows_ok[:, None] & (idx < V), other=float("-inf"))
            u = _unsigned_key(x)
            # the digits above this one match (those a settled row holds below them do not matter)
            keep = _survives(x, idx, vk, id_k) & (((u ^ prefix[:, None]) >> shift.to(tl.uint64)) < 16)
            if WEIGHTED:
                amount = tl.where(keep, tl.exp(_div(x - xmax[:, None], t[:, None], inv_t[:, None])), 0.0)
            else:
                amount = keep.to(tl.float64)
            digit = ((u >> shift.to(tl.uint64)) & 15).to(tl.int32)
            hist += tl.sum(tl.where(digit[:, None, :] == digits[None, :, None], amount[:, None, :], 0.0), axis=2)
            lo = tl.minimum(lo, tl.min(tl.where(keep, u, ONES), axis=1))
            hi = tl.maximum(hi, tl.max(tl.where(keep, u, 0), axis=1))
        at_or_above = tl.sum(tl.where(digits[None, None, :] >= digits[None, :, None], hist[:, None, :], 0.0), axis=2)  # [r, d]: digits >= d
        d = tl.max(tl.where(at_or_above >= need[:, None], digits[None, :], 0), axis=1)
        settled = lo == hi
        need -= tl.where(settled, 0.0, tl.sum(tl.where(digits[None, :] == d[:, None], at_or_above - hist, 0.0), axis=1))  # digits above d
        prefix = tl.where(settled, lo, prefix | (d.to(tl.uint64) << shift.to(tl.uint64)))
        unsettled = tl.sum((~settled).to(tl.int32))
        shift -= 4
    return _from_unsigned_key(prefix), need


@triton.jit
def _tie_cut(x_ptr, rows_ok, v, vk, id_k, ties, V, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: the id of the ties-th survivor of the cut (vk, id_k) equal to v, counting by id
    (the last tie a cut at v keeps); V - 1 when there are fewer."""
    cols = tl.arange(0, BLOCK)
    seen = tl.zeros((ROWS,), tl.float64)
    cut = tl.zeros((ROWS,), tl.int64) + V - 1
    for start in range(0, V, BLOCK):
        idx = start + cols[None, :]
        x = tl.load(x_ptr + idx, mask=rows_ok[:, None] & (idx < V), other=float("-inf"))
        tie = (x == v[:, None]) & _survives(x, idx, vk, id_k) & (idx < V)
        n = tl.cumsum(tie.to(tl.float64), axis=1) + seen[:, None]
        cut = tl.minimum(cut, tl.min(tl.where(tie & (n == ties[:, None]), idx, V - 1), axis=1).to(tl.int64))
        seen += tl.sum(tie.to(tl.float64), axis=1)
    return cut


@triton.jit
def _sample_kernel(logits_ptr, stride_l, x_ptr, counts_ptr, stride_c, bias_ptr, stride_b,
                   scale_ptr, inv_scale_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr,  # RowParams' order
                   rep_ptr, inv_rep_ptr, presence_ptr, frequency_ptr, position_ptr, token_ptr, logprob_ptr, B, V,
                   PENALTIES: tl.constexpr, BIAS: tl.constexpr, LOGPROBS: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
    NEG_INF: tl.constexpr = float("-inf")
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rows_ok = rows < B
    cols = tl.arange(0, BLOCK)
    x_ptr += rows[:, None] * V  # [ROWS, 1] row starts of the processed copy
    ts = tl.load(scale_ptr + rows, mask=rows_ok, other=1.0)  # the temperature, 1 for greedy rows
    inv_ts = tl.load(inv_scale_ptr + rows, mask=rows_ok, other=1.0)  # 1 / ts, made on the host

    # Pass 1: x = the row in float64 with penalties and bias (kept in x_ptr), its maximum, and
    # whether any value is NaN or +inf.
    xmax = tl.full((ROWS,), NEG_INF, tl.float64)
    bad = tl.zeros((ROWS,), tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + cols[None, :]
        inside = rows_ok[:, None] & (idx < V)
        x = tl.load(logits_ptr + rows[:, None] * stride_l + idx, mask=inside, other=NEG_INF).to(tl.float64)
        bad |= tl.max(tl.where(inside & ~(x < float("inf")), 1, 0), axis=1)
        if PENALTIES:
            n = tl.load(counts_ptr + rows[:, None] * stride_c + idx, mask=inside, other=0)
            rep = tl.load(rep_ptr + rows, mask=rows_ok, other=1.0)[:, None]
            subtract = tl.load(presence_ptr + rows, mask=rows_ok, other=0.0)[:, None] \
                + tl.load(frequency_ptr + rows, mask=rows_ok, other=0.0)[:, None] * n.to(tl.float64)
            inv_rep = tl.load(inv_rep_ptr + rows, mask=rows_ok, other=1.0)[:, None]
            x = tl.where(n > 0, tl.where(x > 0, _div(x, rep, inv_rep), x * rep) - subtract, x)
        if BIAS:
            x += tl.load(bias_ptr + rows[:, None] * stride_b + idx, mask=inside, other=0.0)
        x = tl.where(inside, x, NEG_INF)
        tl.store(x_ptr + idx, x, mask=inside)
        xmax = tl.maximum(xmax, tl.max(x, axis=1))

    # Top-k: the k-th best value and, of the tokens equal to it, the lowest ids up to k in all.
    # k comes in 1..V (row_params): V for a row without top-k (the cut keeps everything), 1 for a
    # greedy row (the argmax, ties to the lowest id, is then all that survives, so the draw picks
    # it: greedy rows need no path of their own).
    k = tl.load(top_k_ptr + rows, mask=rows_ok, other=1).to(tl.float64)
    v_all, id_all = tl.full((ROWS,), NEG_INF, tl.float64), tl.zeros((ROWS,), tl.int64) + V - 1  # the cut keeping all
    vk, rest = _select(x_ptr, rows_ok, xmax, ts, inv_ts, v_all, id_all, k, V, False, ROWS, BLOCK)
    id_k = _tie_cut(x_ptr, rows_ok, vk, v_all, id_all, rest, V, ROWS, BLOCK)

    # Top-p on the top-k survivors, w = exp((x - xmax) / t): the shortest ranked prefix (x
    # descending, id ascending) whose mass reaches top_p * their total.
    top_p = tl.load(top_p_ptr + rows, mask=rows_ok, other=1.0)
    total = tl.zeros((ROWS,), tl.float64)
    for start in range(0, V, BLOCK):
        idx = start + cols[None, :]
        x = tl.load(x_ptr + idx, mask=rows_ok[:, None] & (idx < V), other=NEG_INF)
        total += tl.sum(tl.where(_survives(x, idx, vk, id_k), tl.exp(_div(x - xmax[:, None], ts[:, None], inv_ts[:, None])), 0.0), axis=1)
    v, rest = _select(x_ptr, rows_ok, xmax, ts, inv_ts, vk, id_k, top_p * total, V, True, ROWS, BLOCK)
    ties = tl.maximum(tl.ceil(rest * tl.exp(-_div(v - xmax, ts, inv_ts))), 1.0)  # tied tokens weigh the same each
    cut = _tie_cut(x_ptr, rows_ok, v, vk, id_k, ties, V, ROWS, BLOCK)
    top_p_on = top_p < 1
    vp, id_p = tl.where(top_p_on, v, vk), tl.where(top_p_on, cut, id_k)

    # Min-p and the Gumbel-max draw over what survives, ties to the lowest id.
    min_p = tl.load(min_p_ptr + rows, mask=rows_ok, other=0.0)
    seed = tl.load(seed_ptr + rows, mask=rows_ok, other=0).to(tl.uint64, bitcast=True)
    position = tl.load(position_ptr + rows, mask=rows_ok, other=0).to(tl.uint64, bitcast=True)
    key = _mix64(_mix64(seed + GAMMA) ^ position)
    best = tl.full((ROWS,), NEG_INF, tl.float64)
    token = tl.zeros((ROWS,), tl.int64)  # the top token always survives with a finite score
    for start in range(0, V, BLOCK):
        idx = start + cols[None, :]
        x = tl.load(x_ptr + idx, mask=rows_ok[:, None] & (idx < V), other=NEG_INF)
        z = _div(x - xmax[:, None], ts[:, None], inv_ts[:, None])
        keep = _survives(x, idx, vp, id_p) & (tl.exp(z) >= min_p[:, None])
        h = _mix64(key[:, None] + (idx.to(tl.uint64) + 1) * GAMMA)
        u = ((h >> 11).to(tl.float64) + 0.5) * 1.1102230246251565e-16  # 53 bits, inside (0, 1)
        score = tl.where(keep, z - tl.log(-tl.log(u)), NEG_INF)
        block_best = tl.max(score, axis=1)
        first = tl.min(tl.where(score == block_best[:, None], idx, V), axis=1).to(tl.int64)
        token = tl.where(block_best > best, first, token)
        best = tl.maximum(best, block_best)

    if LOGPROBS:  # log-softmax at the temperature (1 for greedy rows) over the processed row
        total = tl.zeros((ROWS,), tl.float64)
        for start in range(0, V, BLOCK):
            idx = start + cols[None, :]
            x = tl.load(x_ptr + idx, mask=rows_ok[:, None] & (idx < V), other=NEG_INF)
            total += tl.sum(tl.exp(_div(x - xmax[:, None], ts[:, None], inv_ts[:, None])), axis=1)
        chosen = tl.load(x_ptr + token[:, None], mask=rows_ok[:, None], other=0.0)
        tl.store(logprob_ptr + rows, _div(tl.sum(chosen, axis=1) - xmax, ts, inv_ts) - tl.log(total), mask=rows_ok)
    ok = rows_ok & (bad == 0) & (xmax > NEG_INF)
    if PENALTIES:  # the chosen token counts from the next step on
        counted = counts_ptr + rows * stride_c + token
        tl.store(counted, tl.load(counted, mask=ok, other=0) + 1, mask=ok)
    token = tl.where(xmax == NEG_INF, _ALL_MASKED, token)
    tl.store(token_ptr + rows, tl.where(bad != 0, _NAN_OR_INF, token), mask=rows_ok)


class RowParams(NamedTuple):
    """Per-row parameters as the kernel reads them: [B] tensors on the logits' device, made once
    per batch by row_params (a decode loop makes them once and reuses them every step)."""
    scale: torch.Tensor  # float64: the temperature, 1 for greedy rows
    inv_scale: torch.Tensor  # float64: 1 / scale, for the kernel's divisions (see _div)
    top_k: torch.Tensor  # int64 in 1..V: 1 for greedy rows (the argmax), V where top-k is off
    top_p: torch.Tensor  # float64
    min_p: torch.Tensor  # float64
    seeds: torch.Tensor  # int64 holding the uint64 seed's bits
    repetition: torch.Tensor | None  # float64, None when no row has penalties (then counts are not needed)
    inv_repetition: torch.Tensor | None
    presence: torch.Tensor | None
    frequency: torch.Tensor | None


def row_params(V, temperature, top_k, top_p, min_p, seeds, repetition=None, presence=None, frequency=None) -> RowParams:
    """RowParams from [B] tensors on one device: temperature, top_p, min_p (float), top_k (int, 0 =
    off), seeds (int64 holding the uint64's bits); repetition, presence, frequency (float) all or
    none. V: the vocabulary size the top-k is clamped to."""
    f64 = lambda t: t.to(torch.float64)  # noqa: E731
    greedy = temperature <= 0
    scale = torch.where(greedy, 1.0, f64(temperature))
    k = torch.where(greedy, 1, torch.where((top_k > 0) & (top_k < V), top_k.to(torch.int64), V))
    penalties = (repetition, presence, frequency)
    if any(t is None for t in penalties) and any(t is not None for t in penalties):
        raise ValueError("repetition, presence and frequency must be given all together or not at all")
    pen = (f64(repetition), 1.0 / f64(repetition), f64(presence), f64(frequency)) if repetition is not None else (None,) * 4
    return RowParams(scale, 1.0 / scale, k, f64(top_p), f64(min_p), seeds.to(torch.int64), *pen)


def _launch(logits, params: RowParams, positions, counts, bias, logprobs, rows_per_program):
    """The launch and the (tokens, log-probs) it will write; reads no data (kernels/compile.py runs it on meta tensors)."""
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [B, V] with V >= 1, got {list(logits.shape)}")
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    vectors = {**params._asdict(), "positions": positions}
    if counts is None:
        vectors = {name: t for name, t in vectors.items() if name not in ("repetition", "inv_repetition", "presence", "frequency")}
    for name, t in vectors.items():
        if t is None or t.shape != (B,) or t.device != logits.device:
            raise ValueError(f"{name} must be a [{B}] tensor on {logits.device}" + (" (counts need penalties)" * (t is None)))
    if positions.dtype != torch.int64:
        raise ValueError(f"positions must be int64, got {positions.dtype}")
    for name, t in (("counts", counts), ("bias", bias)):
        if t is not None and (t.shape != (B, V) or t.stride(1) != 1 or t.device != logits.device):
            raise ValueError(f"{name} must be a row-contiguous [{B}, {V}] tensor on {logits.device}")
    rows = rows_per_program or (1 if logits.device.type == "cuda" else 128)
    rows = min(triton.next_power_of_2(rows), triton.next_power_of_2(B))
    x = torch.empty(B, V, dtype=torch.float64, device=logits.device)  # the processed rows
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    # (without log-probs an empty tensor, never written: a custom op's outputs must compare equal, and NaN does not)
    lps = torch.full((B,) if logprobs else (0,), float("nan"), dtype=torch.float64, device=logits.device)
    penalties = params[6:] if counts is not None else (x,) * 4  # x: never read
    args = (logits, logits.stride(0), x, x if counts is None else counts, 0 if counts is None else counts.stride(0),
            x if bias is None else bias, 0 if bias is None else bias.stride(0), *params[:6], *penalties,
            positions, tokens, lps, B, V)
    # _select holds [ROWS, 16, BLOCK]: at most 2^20 elements (Triton's limit on a tensor)
    constexprs = dict(PENALTIES=counts is not None, BIAS=bias is not None, LOGPROBS=logprobs, ROWS=rows,
                      BLOCK=min(128 if rows == 1 else 2**16 // rows, 1024, triton.next_power_of_2(V)))
    # maxnreg: without a budget, ptxas aims Triton 3.9's build of this kernel (ptxas 12.9 for
    # sm_80, 13.4 for sm_90) at 40-64 registers and spills a few long-lived values, saved
    # predicates among them, to the stack, though 256 threads may hold 255 registers each; given
    # the budget it allocates 96-108 and spills nothing (Triton 3.6's builds: 122-134).
    launch = Launch(_sample_kernel, checked_grid(triton.cdiv(B, rows)), args, constexprs, 8, 1, maxnreg=MAXNREG)
    return launch, tokens, lps


# A custom op (kernels/launch.py: kernel_op), so that torch.compile traces a decode step with its draw
# whole: RowParams goes in as its tensors; counts, the one input written, is declared so ((a!)).
@kernel_op("sample", "(Tensor logits, Tensor scale, Tensor inv_scale, Tensor top_k, Tensor top_p, Tensor min_p, "
           "Tensor seeds, Tensor? repetition, Tensor? inv_repetition, Tensor? presence, Tensor? frequency, "
           "Tensor positions, Tensor(a!)? counts, Tensor? bias, bool logprobs, int rows_per_program) -> (Tensor, Tensor)",
           mutates_args=("counts",))
def _sample_op(logits, scale, inv_scale, top_k, top_p, min_p, seeds, repetition, inv_repetition, presence, frequency,
               positions, counts, bias, logprobs, rows_per_program, run):
    params = RowParams(scale, inv_scale, top_k, top_p, min_p, seeds, repetition, inv_repetition, presence, frequency)
    launch, tokens, lps = _launch(logits, params, positions, counts, bias, logprobs, rows_per_program or None)
    run([launch])
    return tokens, lps


def sample(logits, params: RowParams, positions, counts=None, bias=None, logprobs=False, rows_per_program=None):
    """Tokens [B] int64 (and log-probs [B] float64 when logprobs) of one decode step, on logits' device
    (the custom op llm_engine::sample).

    logits: [B, V] float32/16. params: row_params(...) of the batch. positions: [B] int64, the RNG
    counter (the sequence position of the token being drawn). counts: [B, V] int32 token counts
    (prompt + generated) for the penalties, updated in place with the chosen tokens; None = no
    penalties in the batch (params may then have none). bias: [B, V] float64 logit bias or None.
    A token of NAN_OR_INF or ALL_MASKED marks a bad row. rows_per_program: default 1 on a GPU (a
    row per program, B programs in parallel) and 128 elsewhere (the interpreter pays per operation,
    not per element).
    """
    tokens, lps = _sample_op(logits, *params, positions, counts, bias, logprobs, rows_per_program or 0)
    return (tokens, lps) if logprobs else tokens


def aot_configs() -> list[dict]:
    """The GPU builds (a row per program) for kernels/compile.py: every combination of penalties,
    bias and log-probs at Llama 3's vocabulary (V % 16 == 0), and all on at GPT-2's (odd V)."""
    configs = []
    for arch, (penalties, bias, logprobs), V in itertools.product((80, 90), itertools.product((False, True), repeat=3),
                                                                 (128256, 50257)):
        if V % 16 and not (penalties and bias and logprobs) or (penalties, bias) not in ((False, False), (True, True)):
            continue
        meta = dict(device="meta")
        vec = lambda dtype=torch.float64: torch.empty(8, dtype=dtype, **meta)  # noqa: E731
        params = row_params(V, vec(), vec(torch.int64), vec(), vec(), vec(torch.int64),
                            *((vec(), vec(), vec()) if penalties else ()))
        launch, _, _ = _launch(torch.empty(8, V, **meta), params, vec(torch.int64),
                               torch.empty(8, V, dtype=torch.int32, **meta) if penalties else None,
                               torch.empty(8, V, dtype=torch.float64, **meta) if bias else None, logprobs, 1)
        flags = "".join(name for name, on in (("P", penalties), ("B", bias), ("L", logprobs)) if on) or "-"
        configs.append({"kernel": "sample", "arch": arch, "launch": launch, "wgmma": False,
                        "wide": ("stride_l",) + ("stride_c",) * penalties + ("stride_b",) * bias,
                        "config": f"V%16{'=0' if V % 16 == 0 else '>0'} {flags} ROWS=1 BLOCK={launch.constexprs['BLOCK']} w{launch.num_warps}"})
    return configs
