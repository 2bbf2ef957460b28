"""Token sampling on the device: the C++ sampler's whole chain as one Triton kernel, same tokens.

    penalties -> logit bias -> temperature -> top-k -> top-p -> min-p -> Gumbel-max draw

One program per row walks the vocabulary in blocks, in float64 like engine._sampler (read
engine/sampling.py's docstring for the definitions). Where the C++ code sorts, this kernel
searches: the k-th best value by bisection on the bits of float64 (ordered as integers), ties
settled by a second bisection on the token id, and the top-p cut the same way on the mass above a
value. So a row costs O(V * 64) memory-bound passes, no sort and no scratch beyond one float64 copy
of the processed row: fine for a decode step's few rows; the point is that the draw stays on the
device (only B ids cross to the host, and a CUDA graph can hold it).

The draw is the counter-based Gumbel-max of engine/sampling.py: u = splitmix64(key(seed,
position) + (token + 1) * gamma), key = -log(-log u) added to the tempered logit; the best key
wins, ties to the lowest id. Sums (the top-p mass) run in another order than the C++ loop's, so a
cut that falls within a rounding of the threshold can differ; the tests build their cases away
from such boundaries.

Rows report bad logits through the token: -1 for NaN or +inf in the row, -2 when every token is
-inf after the bias (the caller raises, as the C++ sampler does).
"""
import torch
import triton
import triton.language as tl

from kernels.launch import checked_grid

GAMMA = tl.constexpr(0x9E3779B97F4A7C15)  # splitmix64's increment
NAN_OR_INF = tl.constexpr(-1)  # the token of a row with NaN or +inf logits
ALL_MASKED = tl.constexpr(-2)  # the token of a row that is -inf everywhere after the bias


@triton.jit
def _mix64(z):
    """splitmix64's finaliser on uint64 (multiplications wrap)."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _order_key(x):
    """float64 -> int64 with the same order (negative floats: flip all but the sign bit)."""
    bits = x.to(tl.int64, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFFFFFFFFFF)


@triton.jit
def _from_order_key(key):
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFFFFFFFFFF)
    return bits.to(tl.float64, bitcast=True)


@triton.jit
def _midpoint(lo, hi):
    """ceil((lo + hi) / 2) without overflowing int64."""
    return (lo >> 1) + (hi >> 1) + ((lo & 1) | (hi & 1))


@triton.jit
def _sample_kernel(logits_ptr, stride_l, x_ptr, counts_ptr, stride_c, bias_ptr, stride_b,
                   temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, rep_ptr, presence_ptr, frequency_ptr,
                   seed_ptr, position_ptr, token_ptr, logprob_ptr, V,
                   PENALTIES: tl.constexpr, BIAS: tl.constexpr, LOGPROBS: tl.constexpr, ID_BITS: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    logits_ptr += row * stride_l
    x_ptr += row * V
    t = tl.load(temperature_ptr + row)
    NEG_INF: tl.constexpr = float("-inf")

    # Pass 1: x = the row in float64 with penalties and bias (kept in x_ptr), its maximum and the
    # first id holding it, and whether any value is NaN or +inf.
    xmax = tl.full((), NEG_INF, tl.float64)
    argmax = tl.full((), 0, tl.int64)
    bad = tl.full((), 0, tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + cols
        inside = idx < V
        x = tl.load(logits_ptr + idx, mask=inside, other=NEG_INF).to(tl.float64)
        bad |= tl.max(tl.where(inside & ~(x < float("inf")), 1, 0), axis=0)
        if PENALTIES:
            n = tl.load(counts_ptr + row * stride_c + idx, mask=inside, other=0)
            rep = tl.load(rep_ptr + row)
            penalized = tl.where(x > 0, x / rep, x * rep) - (tl.load(presence_ptr + row) + tl.load(frequency_ptr + row) * n.to(tl.float64))
            x = tl.where(n > 0, penalized, x)
        if BIAS:
            x += tl.load(bias_ptr + row * stride_b + idx, mask=inside, other=0.0)
        x = tl.where(inside, x, NEG_INF)
        tl.store(x_ptr + idx, x, mask=inside)
        block_max = tl.max(x, axis=0)
        first = tl.min(tl.where(x == block_max, idx, V), axis=0).to(tl.int64)
        argmax = tl.where(block_max > xmax, first, argmax)
        xmax = tl.maximum(xmax, block_max)

    token = argmax
    if t > 0:
        # Top-k: the k-th best value vk (the largest v with #{x >= v} >= k), then, of the tokens
        # equal to it, the lowest ids up to k in all: survivors are x > vk, or x == vk with id <= id_k.
        k = tl.load(top_k_ptr + row)
        vk = tl.full((), NEG_INF, tl.float64)
        id_k = tl.full((), 0, tl.int64) + V - 1
        if (k > 0) & (k < V):
            vk = _last_value_with(x_ptr, 0.0, _order_key(vk), _order_key(xmax), k.to(tl.float64), 0.0, vk, id_k,
                                  V, False, BLOCK)
            id_k = _last_tie(x_ptr, vk, (k - _count_above(x_ptr, vk, V, BLOCK)).to(tl.float64), 1.0, 0.0, V, ID_BITS, BLOCK)

        # Top-p on the top-k survivors: w = exp((x - xmax) / t); keep the shortest ranked prefix
        # whose mass reaches top_p * total (ranked: x descending, id ascending).
        top_p = tl.load(top_p_ptr + row)
        vp = vk
        id_p = id_k
        if top_p < 1:
            total = tl.full((), 0.0, tl.float64)
            for start in range(0, V, BLOCK):
                idx = start + cols
                x = tl.load(x_ptr + idx, mask=idx < V, other=NEG_INF)
                keep = (x > vk) | ((x == vk) & (idx <= id_k))
                total += tl.sum(tl.where(keep, tl.exp((x - xmax) / t), 0.0), axis=0)
            threshold = top_p * total
            # the largest v whose survivors at or above it weigh >= threshold
            vp = _last_value_with(x_ptr, xmax, _order_key(vk), _order_key(xmax), threshold, t, vk, id_k, V, True, BLOCK)
            # the tokens tied at vp weigh the same each: the fewest, lowest ids that reach the threshold
            above = tl.full((), 0.0, tl.float64)
            for start in range(0, V, BLOCK):
                idx = start + cols
                x = tl.load(x_ptr + idx, mask=idx < V, other=NEG_INF)
                above += tl.sum(tl.where(x > vp, tl.exp((x - xmax) / t), 0.0), axis=0)
            id_p = _last_tie(x_ptr, vp, threshold, tl.exp((vp - xmax) / t), above, V, ID_BITS, BLOCK)
            id_p = tl.where(vp == vk, tl.minimum(id_p, id_k), id_p)

        # Min-p and the Gumbel-max draw over the survivors, ties to the lowest id.
        min_p = tl.load(min_p_ptr + row)
        key = _mix64(_mix64(tl.load(seed_ptr + row).to(tl.uint64, bitcast=True) + GAMMA)
                     ^ tl.load(position_ptr + row).to(tl.uint64, bitcast=True))
        best = tl.full((), NEG_INF, tl.float64)
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = tl.load(x_ptr + idx, mask=idx < V, other=NEG_INF)
            z = (x - xmax) / t
            keep = ((x > vp) | ((x == vp) & (idx <= id_p))) & (tl.exp(z) >= min_p)
            h = _mix64(key + (idx.to(tl.uint64) + 1) * GAMMA)
            u = ((h >> 11).to(tl.float64) + 0.5) * 1.1102230246251565e-16  # 2^-53
            score = tl.where(keep, z - tl.log(-tl.log(u)), NEG_INF)
            block_best = tl.max(score, axis=0)
            first = tl.min(tl.where(score == block_best, idx, V), axis=0).to(tl.int64)
            token = tl.where(block_best > best, first, token)
            best = tl.maximum(best, block_best)

    if LOGPROBS:
        scale = tl.where(t > 0, t, 1.0)
        total = tl.full((), 0.0, tl.float64)
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = tl.load(x_ptr + idx, mask=idx < V, other=NEG_INF)
            total += tl.sum(tl.exp((x - xmax) / scale), axis=0)
        chosen = tl.load(x_ptr + token)
        tl.store(logprob_ptr + row, (chosen - xmax) / scale - tl.log(total))
    if PENALTIES:  # the chosen token counts from the next step on
        tl.store(counts_ptr + row * stride_c + token, tl.load(counts_ptr + row * stride_c + token) + 1,
                 mask=(bad == 0) & (xmax > NEG_INF))
    token = tl.where(xmax == NEG_INF, ALL_MASKED, token)
    tl.store(token_ptr + row, tl.where(bad != 0, NAN_OR_INF, token))


@triton.jit
def _count_above(x_ptr, v, V, BLOCK: tl.constexpr):
    """#{x > v}."""
    cols = tl.arange(0, BLOCK)
    n = tl.full((), 0, tl.int64)
    for start in range(0, V, BLOCK):
        idx = start + cols
        x = tl.load(x_ptr + idx, mask=idx < V, other=float("-inf"))
        n += tl.sum((x > v).to(tl.int64), axis=0)
    return n


@triton.jit
def _last_value_with(x_ptr, xmax, lo, hi, need, t, vk, id_k, V, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    """Bisection on order keys in [lo, hi]: the largest v such that the survivors of the top-k cut
    (vk, id_k) with x >= v number (WEIGHTED false) or weigh (true: sum of exp((x - xmax) / t))
    at least `need`. 64 halvings cover every float64; P(lo) must hold."""
    cols = tl.arange(0, BLOCK)
    for _ in range(64):
        active = lo < hi
        mid = _midpoint(lo, hi)
        v = _from_order_key(mid)
        amount = tl.full((), 0.0, tl.float64)
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = tl.load(x_ptr + idx, mask=idx < V, other=float("-inf"))
            keep = ((x > vk) | ((x == vk) & (idx <= id_k))) & (x >= v)
            if WEIGHTED:
                amount += tl.sum(tl.where(keep, tl.exp((x - xmax) / t), 0.0), axis=0)
            else:
                amount += tl.sum(keep.to(tl.float64), axis=0)
        ok = amount >= need
        lo = tl.where(active & ok, mid, lo)
        hi = tl.where(active & ~ok, mid - 1, hi)
    return _from_order_key(lo)


@triton.jit
def _last_tie(x_ptr, v, need, w, base, V, ID_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """The smallest id c with base + w * #{x == v, id <= c} >= need: the last of the tokens tied
    at v that a cut keeps (ties go to the lowest ids). Bisection on the id."""
    cols = tl.arange(0, BLOCK)
    lo = tl.full((), 0, tl.int64)
    hi = tl.full((), 0, tl.int64) + V - 1
    for _ in range(ID_BITS):
        active = lo < hi
        mid = (lo + hi) // 2
        n = tl.full((), 0, tl.int64)
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = tl.load(x_ptr + idx, mask=idx < V, other=float("-inf"))
            n += tl.sum(((x == v) & (idx <= mid)).to(tl.int64), axis=0)
        ok = base + w * n.to(tl.float64) >= need
        hi = tl.where(active & ok, mid, hi)
        lo = tl.where(active & ~ok, mid + 1, lo)
    return lo


def sample(logits, temperature, top_k, top_p, min_p, seeds, positions, counts=None, repetition=None, presence=None,
           frequency=None, bias=None, logprobs=False):
    """Tokens [B] int64 (and log-probs [B] float64 when logprobs) of one decode step, on logits' device.

    logits: [B, V] float32/16; per-row parameters as [B] tensors on the same device: temperature,
    top_p, min_p, repetition, presence, frequency (float64), top_k (int64; 0 = off), seeds (int64
    holding the uint64 bits), positions (int64, the RNG counter). counts: [B, V] int32 token counts
    (prompt + generated) for the penalties, updated in place with the chosen tokens; None = no
    penalties in the batch. bias: [B, V] float64 logit bias, None = none. A token of -1 marks a row
    with NaN or +inf logits, -2 a row with nothing left to sample.
    """
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [B, V] with V >= 1, got {list(logits.shape)}")
    B, V = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    rows = dict(temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k, seeds=seeds, positions=positions)
    if counts is not None:
        rows.update(repetition=repetition, presence=presence, frequency=frequency)
    for name, t in rows.items():
        if t is None or t.shape != (B,) or t.device != logits.device:
            raise ValueError(f"{name} must be a [{B}] tensor on {logits.device}")
    for name, t in (("counts", counts), ("bias", bias)):
        if t is not None and (t.shape != (B, V) or t.stride(1) != 1):
            raise ValueError(f"{name} must be a row-contiguous [{B}, {V}] tensor")
    x = torch.empty(B, V, dtype=torch.float64, device=logits.device)  # the processed rows
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    lps = torch.full((B,), float("nan"), dtype=torch.float64, device=logits.device)
    dummy = x  # stands in for pointers a specialisation never reads
    f64 = lambda t: t.to(torch.float64)  # noqa: E731
    _sample_kernel[checked_grid(B)](
        logits, logits.stride(0), x, counts if counts is not None else dummy, counts.stride(0) if counts is not None else 0,
        bias if bias is not None else dummy, bias.stride(0) if bias is not None else 0,
        f64(temperature), top_k.to(torch.int64), f64(top_p), f64(min_p),
        *(f64(t) if counts is not None else dummy for t in (repetition, presence, frequency)),
        seeds.to(torch.int64), positions.to(torch.int64), tokens, lps, V,
        PENALTIES=counts is not None, BIAS=bias is not None, LOGPROBS=logprobs, ID_BITS=max(1, (V - 1).bit_length()),
        BLOCK=min(1024, triton.next_power_of_2(V)))
    return (tokens, lps) if logprobs else tokens
