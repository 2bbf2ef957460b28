"""Fused LayerNorm, and residual add + LayerNorm, in Triton: forward and backward.

    y = (s - mean(s)) * rstd * weight + bias,  rstd = 1 / sqrt(var(s) + eps),  over the last dim
    s = x                 (layer_norm)
    s = x + residual      (add_layer_norm: s is written once, for the residual stream)

Statistics are computed in fp32 whatever the input dtype; mean and rstd are saved for the
backward. A row that fits in registers is read once; a longer one (N above the table's
largest block) is streamed in chunks, with the chunk statistics merged by Chan's formula.

Backward: dx in one pass over each row. dweight and dbias in two stages: each program walks
its rows and sums dy * xhat and dy into its own fp32 partial row, then a small kernel adds
the partial rows in a fixed order. No atomics, so the gradients are bitwise reproducible.

RMSNorm (kernels/rmsnorm.py) runs these kernels with the constexpr RMS: the mean is 0 (not
computed, stored or read), there is no bias, and the backward's mean(w*dy) term drops out.

The launches (kernel, grid, arguments, constexprs, warps, stages) are computed by
_forward_launches / _backward_launches, which read no data: `aot_configs()` runs them on meta
tensors, so kernels/compile.py builds exactly the kernels that run, and the custom ops
(llm_engine::norm, norm_backward) run them on fake tensors as their fake implementations. Grids
are 1-D (axis x, up to 2^31 - 1 programs); row offsets are 64-bit.
"""
import functools
import itertools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.launch import Launch, checked_grid, kernel_op

MAX_N = 65536  # largest feature size; the chunked path is written for it


@triton.jit
def _load_s(X, R, S, rows, c, mask, stride_xm, stride_rm, stride_sm, HAS_RESIDUAL: tl.constexpr):
    """A [ROWS, BLOCK_N] tile of s in fp32; with a residual, also stores s = x + residual."""
    s = tl.load(X + rows[:, None] * stride_xm + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_rm + c[None, :], mask=mask, other=0.0).to(tl.float32)
        # Round to s's dtype first: y must be the LayerNorm of the s that is handed back.
        s_out = (s + r).to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_sm + c[None, :], s_out, mask=mask)
        s = s_out.to(tl.float32)
    return s


@triton.jit
def _store_y(Y, W, B, rows, c, mask, xhat, N, stride_ym, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = xhat
    if HAS_WEIGHT:
        y = y * tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + c, mask=c < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_ym + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


# Row counts are not specialised (do_not_specialize): M == 1 or M % 16 == 0 would only add builds.
@triton.jit(do_not_specialize=["M"])
def _ln_fwd_kernel(
    X, R, S, Y, W, B, Mean, Rstd,
    stride_xm, stride_rm, stride_sm, stride_ym,
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKED: tl.constexpr, RMS: tl.constexpr,
):
    """ROWS rows per program. Not CHUNKED: the row is one tile held in registers. RMS: RMSNorm,
    the mean taken as 0 (rstd = 1 / sqrt(mean(s^2) + eps)) and not stored."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    rows = rows.to(tl.int64)  # row * stride can pass 2**31 on large batches
    cols = tl.arange(0, BLOCK_N)
    if CHUNKED:
        # Pass 1: exact mean and sum of squared deviations per chunk, merged into the
        # running ones (Chan et al.): no cancellation, unlike sum(x^2) - sum(x)^2. RMS: the
        # mean stays 0 and m2 is the plain sum of squares, which has nothing to cancel.
        mean = tl.zeros([ROWS], dtype=tl.float32)
        m2 = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < N)[None, :]
            s = _load_s(X, R, S, rows, c, mask, stride_xm, stride_rm, stride_sm, HAS_RESIDUAL)
            if RMS:  # padding lanes hold 0
                m2 += tl.sum(s * s, axis=1)
            else:
                n_a = start * 1.0  # float(start), also when the interpreter hands a Python int
                n_b = tl.minimum(N - start, BLOCK_N) * 1.0
                mean_b = tl.sum(s, axis=1) / n_b
                d = tl.where(mask, s - mean_b[:, None], 0.0)
                delta = mean_b - mean
                mean += delta * (n_b / (n_a + n_b))
                m2 += tl.sum(d * d, axis=1) + delta * delta * (n_a * n_b / (n_a + n_b))
        rstd = tl.rsqrt(m2 / N + eps)
        # Pass 2: normalise; s comes back from L2 (from S when we just wrote it: the barrier
        # makes every thread's stores visible to the threads that read them back).
        tl.debug_barrier()
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < N)[None, :]
            if HAS_RESIDUAL:
                s = tl.load(S + rows[:, None] * stride_sm + c[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                s = tl.load(X + rows[:, None] * stride_xm + c[None, :], mask=mask, other=0.0).to(tl.float32)
            xhat = (s - mean[:, None]) * rstd[:, None]  # RMS: mean is a constant 0 (s - 0 is exact: compiled away)
            _store_y(Y, W, B, rows, c, mask, xhat, N, stride_ym, HAS_WEIGHT, HAS_BIAS)
    else:
        mask = row_ok[:, None] & (cols < N)[None, :]
        s = _load_s(X, R, S, rows, cols, mask, stride_xm, stride_rm, stride_sm, HAS_RESIDUAL)
        if RMS:
            # d = s (padding lanes load 0), spelt so that ptxas's occupancy heuristics spill
            # nothing: `d = s` spills 8 B on sm_80 (fp32, 16 rows of 128) under Triton 3.9, and
            # where(mask, s, 0.0) three other sm_80 builds under 3.6 (python -m kernels.compile).
            d = tl.where(row_ok[:, None], s, 0.0)
        else:
            mean = tl.sum(s, axis=1) / N
            d = tl.where(mask, s - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=1) / N + eps)
        _store_y(Y, W, B, rows, cols, mask, d * rstd[:, None], N, stride_ym, HAS_WEIGHT, HAS_BIAS)
    if not RMS:
        tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _load_rows(PTR, rows, c, stride, mask):
    """A [ROWS, BLOCK_N] tile in fp32 (rows are int64: row * stride can pass 2**31 on large batches)."""
    return tl.load(PTR + rows[:, None] * stride + c[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_block(Mean, Rstd, first, M, ROWS: tl.constexpr, RMS: tl.constexpr):
    """Rows [first, first + ROWS) as int64, which of them exist, and their saved mean (RMS: the
    constant 0, nothing read) and rstd, as [ROWS, 1]."""
    rows = first + tl.arange(0, ROWS)
    row_ok = rows < M
    if RMS:
        mean = 0.0
    else:
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)[:, None]
    rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)[:, None]
    return rows.to(tl.int64), row_ok, mean, rstd


@triton.jit
def _store_dx(DX, DS, rows, c, mask, xhat, wdy, c1, c2, rstd, stride_dsm, stride_dxm, HAS_DS: tl.constexpr):
    """dx = rstd * (w*dy - (xhat * c1 + c2)), plus ds: the gradient that reaches s directly in
    add_layer_norm. RMS passes c2 = 0."""
    dx = (wdy - (xhat * c1 + c2)) * rstd
    if HAS_DS:
        dx += _load_rows(DS, rows, c, stride_dsm, mask)
    tl.store(DX + rows[:, None] * stride_dxm + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _ln_bwd_dx_kernel(
    X, W, DY, DS, DX, Mean, Rstd, DW_partial, DB_partial,
    stride_xm, stride_dym, stride_dsm, stride_dxm,
    M, N,
    HAS_DS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, RMS: tl.constexpr,
):
    """dx = rstd * (w*dy - xhat * mean(xhat * w*dy) - mean(w*dy)) (+ ds), the row one tile in
    registers; RMS (xhat = s * rstd, no mean to differentiate through) drops the mean(w*dy) term.
    Program p takes row blocks p, p + P, p + 2P, ... and sums dy * xhat and dy over them into row
    p of DW_partial and DB_partial."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for first in range(pid * ROWS, M, tl.num_programs(0) * ROWS):
        rows, row_ok, mean, rstd = _row_block(Mean, Rstd, first, M, ROWS, RMS)
        mask = row_ok[:, None] & col_ok[None, :]
        x = _load_rows(X, rows, cols, stride_xm, mask)
        dy = _load_rows(DY, rows, cols, stride_dym, mask)
        xhat = (x - mean) * rstd  # padding lanes hold garbage, but dy = 0 there
        wdy = dy
        if HAS_WEIGHT:
            wdy = dy * w
            dw += dy * xhat
        if HAS_BIAS:
            db += dy
        c1 = tl.sum(xhat * wdy, axis=1)[:, None] / N
        if RMS:
            c2 = 0.0
        else:
            c2 = tl.sum(wdy, axis=1)[:, None] / N
        _store_dx(DX, DS, rows, cols, mask, xhat, wdy, c1, c2, rstd, stride_dsm, stride_dxm, HAS_DS)
    # One 32-bit offset per element: as `ptr + pid * N + cols`, LLVM keeps the columns' 64-bit
    # offsets live across the row loop, which Triton 3.6's ptxas spills (RMS, sm_90, fp32).
    if HAS_WEIGHT:
        tl.store(DW_partial + (pid * N + cols), tl.sum(dw, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_partial + (pid * N + cols), tl.sum(db, axis=0), mask=col_ok)


@triton.jit(do_not_specialize=["M"])
def _ln_bwd_dx_chunked_kernel(
    X, W, DY, DS, DX, Mean, Rstd, DW_partial, DB_partial,
    stride_xm, stride_dym, stride_dsm, stride_dxm,
    M, N,
    HAS_DS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, RMS: tl.constexpr,
):
    """_ln_bwd_dx_kernel for rows that do not fit in registers: one pass over a row's chunks for
    the two row sums, one for dx, adding into this program's own partial rows (zeroed by the
    launcher; still deterministic). Partial row offsets pid * N stay 32-bit: programs * MAX_N is
    far below 2**31."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    for first in range(pid * ROWS, M, tl.num_programs(0) * ROWS):
        rows, row_ok, mean, rstd = _row_block(Mean, Rstd, first, M, ROWS, RMS)
        sum_xw = tl.zeros([ROWS], dtype=tl.float32)
        sum_w = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < N)[None, :]
            x = _load_rows(X, rows, c, stride_xm, mask)
            wdy = _load_rows(DY, rows, c, stride_dym, mask)
            if HAS_WEIGHT:
                wdy *= tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)[None, :]
            sum_xw += tl.sum((x - mean) * rstd * wdy, axis=1)
            if not RMS:
                sum_w += tl.sum(wdy, axis=1)
        c1 = (sum_xw / N)[:, None]
        if RMS:
            c2 = 0.0
        else:
            c2 = (sum_w / N)[:, None]
        tl.debug_barrier()  # the partial rows read below were written by other threads
        for start in range(0, N, BLOCK_N):
            c = start + cols
            c_ok = c < N
            mask = row_ok[:, None] & c_ok[None, :]
            x = _load_rows(X, rows, c, stride_xm, mask)
            dy = _load_rows(DY, rows, c, stride_dym, mask)
            xhat = (x - mean) * rstd
            wdy = dy
            part = pid * N + c
            if HAS_WEIGHT:
                wdy = dy * tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(DW_partial + part, tl.load(DW_partial + part, mask=c_ok) + tl.sum(dy * xhat, axis=0), mask=c_ok)
            if HAS_BIAS:
                tl.store(DB_partial + part, tl.load(DB_partial + part, mask=c_ok) + tl.sum(dy, axis=0), mask=c_ok)
            _store_dx(DX, DS, rows, c, mask, xhat, wdy, c1, c2, rstd, stride_dsm, stride_dxm, HAS_DS)


@triton.jit(do_not_specialize=["P"])
def _ln_bwd_reduce_kernel(Partial, Out, P, N, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Out[c] = sum over p of Partial[p, c], always in the same order."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for first in range(0, P, BLOCK_P):
        p = first + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & (cols < N)[None, :]
        acc += tl.load(Partial + p[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=cols < N)


# Launch tables, the forward's of (BLOCK_N, rows per program, warps, chunked). A row of N features
# takes the first unchunked entry with BLOCK_N >= N, else the chunked one (the row streamed in chunks).
# Short rows are packed several to a tile. The forward holds about 16 values per thread per
# tensor up to 8192 features and 32 at 16384 (16 warps; 32 warps spill under both Triton
# versions, see python -m kernels.compile). N <= 128 runs 8 warps both ways: with 4 (forward)
# or 16 (backward), Triton 3.6's ptxas spills 8 B in the N % 16 > 0 builds.
_FWD_CONFIGS = (
    (64, 32, 4, False), (128, 16, 8, False), (256, 8, 4, False), (512, 4, 4, False),
    (1024, 2, 4, False), (2048, 1, 4, False), (4096, 1, 8, False), (8192, 1, 16, False),
    (16384, 1, 16, False), (8192, 1, 16, True),
)
# The backward keeps x, dy, w and the two accumulators live: 8 values per thread per tensor take
# 64-82 registers, and a wider tile (16 per thread) 120-164 or spills. Two layouts, one table of
# _Bwd entries each; the launcher runs BWD_LAYOUT's, and the GPU benchmark is to pick between them.
#   "narrow": 4 to 8 warps, one row per program from 1024 features (Liger's layout and warps):
#     6 to 10 programs fit on an SM at N = 1024, 3 to 5 at 2048, at least 2 from 512 up whatever
#     N % 16 (python -m kernels.compile, Triton 3.6 and 3.9). Past 2048, two rows at a time are
#     streamed in 1024-wide chunks (2 to 4 programs per SM), as a 4096-wide row at 8 warps holds
#     1 program per SM where N % 16 > 0 and one RMS build spills. The chunked kernel reads x and
#     dy twice (the second time from L2) and adds into its fp32 partial rows (in L2) once per 2
#     rows: per bf16 row of 4096, 48 KB of L2 traffic beside the 24-32 KB from memory that both
#     kernels move, so "wide" (one pass) may well be faster there. maxnreg 128: without a budget,
#     Triton 3.6's ptxas aims the fp16 sm_80 build at 48 registers and spills.
#   "wide": the layout before it: 16 warps, one pass up to 4096 features, chunked past it (2 rows
#     per partial-row update). Its 16-bit LayerNorm sm_90 builds take 76-86 registers at N = 1024
#     and 2048 under both Triton versions, and 74 at 4096 under 3.9 (64 under 3.6): 1 program per SM.


class _Bwd(NamedTuple):
    block_n: int
    rows: int  # per program and step; each program walks row blocks p, p + P, p + 2P, ...
    warps: int
    chunked: bool
    # Programs started per SM: the fewest that fit in the compile table's N % 16 == 0 builds (both
    # archs and Triton versions), so that every program runs at once: one more than fit would
    # run after the others, with all its rows.
    per_sm: int
    maxnreg: int | None = None  # ptxas's register budget (kernels/launch.py), None: its own choice


_SHORT_ROWS = (_Bwd(64, 64, 16, False, 2), _Bwd(128, 16, 8, False, 3), _Bwd(256, 16, 16, False, 1))  # both layouts
_BWD_CONFIGS = {
    "narrow": (
        *_SHORT_ROWS, _Bwd(512, 4, 8, False, 3), _Bwd(1024, 1, 4, False, 7), _Bwd(2048, 1, 8, False, 3),
        _Bwd(1024, 2, 8, True, 2, maxnreg=128),
    ),
    "wide": (
        *_SHORT_ROWS, _Bwd(512, 8, 16, False, 1), _Bwd(1024, 4, 16, False, 1), _Bwd(2048, 2, 16, False, 1),
        _Bwd(4096, 1, 16, False, 1), _Bwd(2048, 2, 16, True, 1),
    ),
}
BWD_LAYOUT = "narrow"  # the default until a GPU has measured both (benchmarks/layernorm.py)
# The partial-row reduction: (largest N, BLOCK_P, BLOCK_C, warps). Narrow column blocks give
# short rows enough programs; wide ones keep the program count sane for long rows.
_REDUCE_CONFIGS = ((8192, 128, 32, 8), (MAX_N, 32, 256, 8))
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_NUM_STAGES = 3  # Triton's default, which these launches have always run with


def _pick(table, n):
    return next(cfg for cfg in table if cfg[3] or cfg[0] >= n)


def _pick_reduce(n):
    return next(cfg[1:] for cfg in _REDUCE_CONFIGS if n <= cfg[0])


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, each walking several row blocks


def _as_rows(t, n):
    """A [M, N] view of t with unit stride along N (copied only when it has to be)."""
    t = t.reshape(-1, n)
    return t if t.stride(1) == 1 else t.contiguous()


def _check(x, residual, weight, bias):
    if x.dtype not in _DTYPES:
        raise ValueError(f"x.dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0 or not 1 <= x.shape[-1] <= MAX_N:
        raise ValueError(f"x.shape[-1] (the feature size N) must be between 1 and {MAX_N}, got shape {tuple(x.shape)}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual.shape must equal x.shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype not in _DTYPES or residual.device != x.device:
            raise ValueError(f"residual must be a float32/float16/bfloat16 tensor on {x.device}, got {residual.dtype} on {residual.device}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape != x.shape[-1:] or p.device != x.device):
            raise ValueError(f"{name} must have shape ({x.shape[-1]},) on {x.device}, got {tuple(p.shape)} on {p.device}")


def _contiguous(p):
    return p.contiguous() if p is not None else None


def _forward_launches(x, residual, weight, bias, eps, rms=False):
    """The forward's launches, and y, s (the tensor that is normalised: x + residual, or x itself
    without a residual), both x's shape, and the fp32 mean and rstd [M] that they will write. rms:
    RMSNorm (no bias; the mean is None, as no kernel makes one). Reads no data: kernels/compile.py
    runs it on meta tensors, the custom op on fake ones."""
    if rms and bias is not None:
        raise ValueError("RMSNorm has no bias")
    _check(x, residual, weight, bias)
    weight, bias = _contiguous(weight), _contiguous(bias)
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    m = x2.shape[0]
    if residual is None:
        r2, s, s2 = x2, x, x2
    else:
        r2 = _as_rows(residual, n)
        s = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        s2 = s.view(m, n)
    y = torch.empty(x.shape, dtype=s.dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    mean = None if rms else torch.empty(m, dtype=torch.float32, device=x.device)
    if not m:
        return [], y, s, mean, rstd
    block_n, rows, warps, chunked = _pick(_FWD_CONFIGS, n)
    w = weight if weight is not None else x2  # any pointer; never read
    b = bias if bias is not None else x2
    y2 = y.view(m, n)
    launch = Launch(
        _ln_fwd_kernel, checked_grid(triton.cdiv(m, rows)),
        (x2, r2, s2, y2, w, b, rstd if rms else mean, rstd, x2.stride(0), r2.stride(0), s2.stride(0), y2.stride(0),
         m, n, eps),
        dict(HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
             ROWS=rows, BLOCK_N=block_n, CHUNKED=chunked, RMS=rms),
        warps, _NUM_STAGES)
    return [launch], y, s, mean, rstd


def _backward_launches(dy, ds, s, weight, bias, mean, rstd, num_sms, layout=None):
    """The backward's launches, and dx (the gradient of s, ds included; s's shape), dweight and
    dbias that they will write; mean None: RMSNorm's. layout: a key of _BWD_CONFIGS (default
    BWD_LAYOUT). Reads no data, like _forward_launches."""
    rms = mean is None
    mean = rstd if rms else mean  # RMS: any pointer, never read
    weight, bias = _contiguous(weight), _contiguous(bias)
    n = s.shape[-1]
    s2 = _as_rows(s, n)
    m = s2.shape[0]
    dy2 = _as_rows(dy, n)
    ds2 = _as_rows(ds, n) if ds is not None else dy2
    dx = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    dx2 = dx.view(m, n)
    cfg = _pick(_BWD_CONFIGS[layout or BWD_LAYOUT], n)
    # As many programs as fit on the GPU at once; each walks several row blocks.
    progs = max(1, min(triton.cdiv(m, cfg.rows), num_sms * cfg.per_sm))
    alloc = torch.zeros if cfg.chunked else torch.empty  # the chunked kernel adds into its partial rows
    dw_part = alloc((progs, n), dtype=torch.float32, device=s2.device) if weight is not None else mean
    db_part = alloc((progs, n), dtype=torch.float32, device=s2.device) if bias is not None else mean
    # Launched even for zero rows: it then writes the zero partial sums.
    launches = [Launch(
        _ln_bwd_dx_chunked_kernel if cfg.chunked else _ln_bwd_dx_kernel, checked_grid(progs),
        (s2, weight if weight is not None else s2, dy2, ds2, dx2, mean, rstd, dw_part, db_part,
         s2.stride(0), dy2.stride(0), ds2.stride(0), dx2.stride(0), m, n),
        dict(HAS_DS=ds is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
             ROWS=cfg.rows, BLOCK_N=cfg.block_n, RMS=rms),
        cfg.warps, _NUM_STAGES, cfg.maxnreg)]
    grads = []
    for partial, param in ((dw_part, weight), (db_part, bias)):
        grads.append(None if param is None else torch.empty_like(param))
        if param is not None:
            block_p, block_c, reduce_warps = _pick_reduce(n)
            launches.append(Launch(_ln_bwd_reduce_kernel, checked_grid(triton.cdiv(n, block_c)),
                                   (partial, grads[-1], progs, n), dict(BLOCK_P=block_p, BLOCK_C=block_c),
                                   reduce_warps, _NUM_STAGES))
    return launches, dx, *grads


# Feature sizes on which the launchers pick every build (kernels/compile.py): each table entry's
# largest N, which is a multiple of 16, and one less, which is not (Triton specialises N and the
# row strides on divisibility by 16; rows are vector loads only when it holds); MAX_N for the
# chunked kernels.
_AOT_SIZES = sorted({n for table in (_FWD_CONFIGS, *_BWD_CONFIGS.values()) for block_n, *_ in table
                     for n in (block_n, block_n - 1)} | {MAX_N, MAX_N - 1})
_AOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Row strides, multiplied by int64 row indices (kernels/compile.py checks each build's PTX); the
# partial rows' offsets (programs · N) stay 32-bit.
_WIDE_OFFSETS = {_ln_fwd_kernel: ("stride_xm", "stride_rm", "stride_sm", "stride_ym"),
                 _ln_bwd_dx_kernel: ("stride_xm", "stride_dym", "stride_dsm", "stride_dxm"),
                 _ln_bwd_dx_chunked_kernel: ("stride_xm", "stride_dym", "stride_dsm", "stride_dxm"),
                 _ln_bwd_reduce_kernel: ()}
# Labels; RMS builds (kernels/rmsnorm.py) say "rms_" for "ln_", but the reduction has no RMS flag:
# LayerNorm and RMSNorm share its builds, under one label.
_AOT_NAMES = {_ln_fwd_kernel: "ln_fwd", _ln_bwd_dx_kernel: "ln_bwd_dx", _ln_bwd_dx_chunked_kernel: "ln_bwd_dx_chunked",
              _ln_bwd_reduce_kernel: "ln_bwd_reduce"}


def aot_configs(rms=False) -> list[dict]:
    """Every build the launchers pick, for kernels/compile.py, per arch, dtype and table entry, with
    N % 16 == 0 and not. Each holds the launcher's own Launch, computed on meta tensors (aligned like
    torch's allocations) in the heaviest variant: residual, weight and bias on (without them the
    kernels only drop code), and both backward layouts. rms: RMSNorm's builds instead (no bias)."""
    configs = []
    for arch, dtype, n in itertools.product((80, 90), _AOT_DTYPES, _AOT_SIZES):
        x, residual, dy, ds = (torch.empty(4096, n, dtype=dtype, device="meta") for _ in range(4))
        weight, bias = torch.empty(n, dtype=dtype, device="meta"), None if rms else torch.empty(n, dtype=dtype, device="meta")
        launches, _, s2, mean, rstd = _forward_launches(x, residual, weight, bias, 1e-5, rms)
        for layout in _BWD_CONFIGS:  # a build both layouts run is one label: kernels/compile.py merges them
            launches += _backward_launches(dy, ds, s2, weight, bias, mean, rstd, num_sms=132, layout=layout)[0]
        for launch in launches:
            shape = " ".join(f"{k}={int(v)}" for k, v in launch.constexprs.items() if not k.startswith("HAS_") and k != "RMS")
            name = _AOT_NAMES[launch.kernel]
            if launch.constexprs.get("RMS"):
                name = name.replace("ln_", "rms_", 1)
            configs.append({
                "kernel": name, "arch": arch, "launch": launch, "wgmma": False,
                "wide": _WIDE_OFFSETS[launch.kernel],
                "config": f"{_DTYPES[dtype]} N%16{'=0' if n % 16 == 0 else '>0'} {shape} w{launch.num_warps} s{launch.num_stages}"
                          + (f" r{launch.maxnreg}" if launch.maxnreg else ""),
            })
    return configs


# The anchor, beside our builds at the same N (kernels/compile.py prints them under its table):
# Liger's src/liger_kernel/ops/layer_norm.py with utils.calculate_settings, at N = 4096; the
# backward beside both of our layouts.
_LIGER_BWD = ("Liger: one program per SM, ceil(rows / SMs) rows each, one row at a time, BLOCK_SIZE next_pow2(N) "
              "= 4096 in one pass, 8 warps; dW, dB partials [SMs, N] summed by torch")
AOT_ANCHORS = (
    {"kernel": "ln_fwd", "arch": 90, "ours": "bf16 N%16=0 BLOCK_N=4096",
     "anchor": "Liger: one row per program, BLOCK_SIZE next_pow2(N) = 4096, 8 warps (4 below 2048, 16 from 8192, "
               "32 from 32768), single pass up to N = 65536"},
    {"kernel": "ln_bwd_dx_chunked", "arch": 90, "ours": "bf16 N%16=0 ROWS=2 BLOCK_N=1024 w8", "anchor": _LIGER_BWD},
    {"kernel": "ln_bwd_dx", "arch": 90, "ours": "bf16 N%16=0 ROWS=1 BLOCK_N=4096 w16", "anchor": _LIGER_BWD},
)


# ----------------------------------------------------------------------------- registration
# torch.library.custom_op (kernels/launch.py: kernel_op says why not triton_op). One op pair serves
# layer_norm, add_layer_norm, rms_norm and add_rms_norm, as one set of kernels does.


@kernel_op("norm_backward", "(Tensor dy, Tensor? ds, Tensor s, Tensor? weight, Tensor? bias, Tensor? mean, "
                            "Tensor rstd) -> (Tensor dx, Tensor? dweight, Tensor? dbias)")
def _norm_backward(dy, ds, s, weight, bias, mean, rstd, run):
    """The gradients of s (ds added), weight and bias; mean None: RMSNorm's."""
    launches, dx, dweight, dbias = _backward_launches(dy, ds, s, weight, bias, mean, rstd, _num_sms(s.device))
    run(launches)
    return dx, dweight, dbias


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms = inputs
    y, s, mean, rstd = output
    ctx.save_for_backward(x if s is None else s, weight, bias, mean, rstd)
    ctx.input_dtypes = (x.dtype, residual.dtype if residual is not None else None)


def _backward(ctx, dy, ds, dmean, drstd):
    dx, dweight, dbias = _norm_backward(dy, ds, *ctx.saved_tensors)
    x_dtype, r_dtype = ctx.input_dtypes
    # s = x + residual: both inputs get the same gradient (in their own dtypes).
    dres = dx.to(r_dtype) if r_dtype is not None else None
    return dx.to(x_dtype), dres, dweight, dbias, None, None


@kernel_op("norm", "(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms) "
                   "-> (Tensor y, Tensor? s, Tensor? mean, Tensor rstd)", _backward, _setup_context)
def _norm(x, residual, weight, bias, eps, rms, run):
    """layer_norm(s), s = x + residual, and the fp32 statistics; rms: rms_norm (no bias) instead.
    s is None without a residual (it is x: an op may not return its input), mean None for RMSNorm."""
    launches, y, s, mean, rstd = _forward_launches(x, residual, weight, bias, eps, rms)
    run(launches)
    return y, s if residual is not None else None, mean, rstd


# ----------------------------------------------------------------------------- public


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dimension of x (any leading shape); weight and bias optional."""
    return _norm(x, None, weight, bias, float(eps), False)[0]


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
    """(layer_norm(x + residual), x + residual) in one pass; differentiable in both outputs."""
    y, s, _, _ = _norm(x, residual, weight, bias, float(eps), False)
    return y, s


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm (same arguments, parameters, state_dict keys, repr)."""

    def forward(self, x):
        shape = tuple(self.normalized_shape)
        if tuple(x.shape[-len(shape):]) != shape:
            raise ValueError(f"input's last dims must be {shape}, got shape {tuple(x.shape)}")
        # LayerNorm over the last k dims is LayerNorm over them flattened into one.
        n = math.prod(shape)
        weight = self.weight.reshape(n) if self.weight is not None else None
        bias = self.bias.reshape(n) if self.bias is not None else None
        return layer_norm(x.reshape(*x.shape[: x.dim() - len(shape)], n), weight, bias, self.eps).view(x.shape)
