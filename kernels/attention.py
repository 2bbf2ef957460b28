"""Flash attention in Triton: forward, backward, and flash-decoding over a KV cache.

    o = softmax(q kᵀ · sm_scale + mask) v,   q: [B, H, Sq, D], k, v: [B, H, Sk, D], Sk >= Sq

FlashAttention-2 scheme. The forward streams tiles of K/V past a tile of Q and keeps an online
softmax with fp32 statistics (running row max m and row sum l); scores are scaled by
sm_scale·log2(e) so the exponentials are exp2. It saves the row logsumexp (base 2) so the
backward can rebuild the probabilities without storing them.

Causal masking is bottom-right aligned: query i sits at absolute position i + (Sk - Sq) and
sees keys j <= that position (the KV-cache case). Tiles fully past the diagonal are skipped;
tiles fully below it run without any mask; only the diagonal tiles (and the last, partial key
tile) pay for masking. `kv_start` (left-padded batches) follows engine/reference.py:
key j is visible to query position p iff (j >= kv_start[b]) == (p >= kv_start[b]).

Backward: a preprocess computes delta = rowsum(dO * O); one kernel accumulates dK and dV per
key tile over the query tiles, a second one computes dQ per query tile over the key tiles.
Every gradient element is written by exactly one program that sums in a fixed order, so the
gradients are deterministic (bitwise equal run after run) without atomics. The price is
recomputing Q Kᵀ and dO Vᵀ in the dQ pass (7 matmuls instead of 5); deterministic=False opts
into FlashAttention-2's scheme instead: the dK/dV kernel adds dQ with fp32 atomics.

Decode (Sq <= 16): one query tile per head would use B·H programs, too few to fill a GPU at
batch 1. The keys are split across programs (flash-decoding); each writes its normalised partial
output and logsumexp, and a small kernel combines them.

Launch configs come from one table (_CONFIGS) per arch (sm_80 / sm_90+), kind, 16-bit or fp32,
and head dim; no autotuning. `aot_configs()` lists exactly those for kernels/compile.py, so what
ships is what compiles. The first call of each (kernel, D, dtype, causal, kv_start) JIT-compiles
it: about 1-6 s per kernel measured for the AOT builds on a 2-core CPU (fp32 builds are the
slowest); a training step compiles three kernels, a decode step one or two. Later calls with
any sequence lengths reuse them.

fp32 inputs use exact fp32 dots (input_precision="ieee", CUDA cores), not TF32: slower, but
fp32 means fp32 accuracy here. fp16 / bf16 use tensor cores with fp32 accumulation.
"""
import inspect
import itertools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DECODE_MAX_SQ = 16  # queries per step at or below which the decode (split-KV) path is taken
_MIN_TILES_PER_SPLIT = 2  # a split streams at least this many key tiles


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _visible(q_pos, k_pos, SK, kv_start, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr):
    """True where the query at absolute position q_pos may see key k_pos (shapes broadcast)."""
    ok = k_pos < SK
    if CAUSAL:
        ok = ok & (k_pos <= q_pos)
    if HAS_KV_START:
        ok = ok & ((k_pos >= kv_start) == (q_pos >= kv_start))
    return ok


@triton.jit
def _key_tiles(start_m, lo, hi, SQ, SK, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split the key range [lo, hi) of a query tile into [lo, mid) needing no mask and [mid, hi)
    needing one; keys past the causal frontier of the tile's last row are cut off (skipped)."""
    full = SK // BLOCK_N * BLOCK_N  # the last, partial key tile needs the bounds mask
    if CAUSAL:
        # tile [n, n + BLOCK_N) is visible to every row iff n + BLOCK_N - 1 <= first row's position
        full = tl.minimum(full, (start_m + SK - SQ + 1) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(hi, start_m + BLOCK_M + SK - SQ)
    if HAS_KV_START:
        full = 0  # padding boundaries may fall anywhere: mask every tile
    mid = tl.minimum(tl.maximum(full, lo), hi)
    return mid, hi


@triton.jit
def _load_key_rows(ptrs, k_pos, SK, MASKED: tl.constexpr):
    """A [BLOCK_N, HEAD_DIM] tile of K or V rows; only a tile that may run past SK pays for the
    bounds mask."""
    if MASKED:
        tile = tl.load(ptrs, mask=k_pos[:, None] < SK, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, q_pos, lo, hi, SK, kv_start, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n
        k_ptrs = K + k_pos[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V + k_pos[:, None] * stride_vn + offs_d[None, :]
        k = _load_key_rows(k_ptrs, k_pos, SK, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        if MASKED:
            qk = tl.where(_visible(q_pos[:, None], k_pos[None, :], SK, kv_start, CAUSAL, HAS_KV_START),
                          qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = m_new
        if MASKED:
            # a row that has seen no visible key yet keeps m = -inf; subtracting 0 keeps it NaN-free
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_key_rows(v_ptrs, k_pos, SK, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KV_START, sm_scale,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_os, stride_ls,
              H, SQ, SK, SPLIT_SIZE,
              CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile against the keys [split · SPLIT_SIZE, +SPLIT_SIZE). O and LSE are contiguous
    [splits, B·H, SQ, (D)]: with one split they are the result, else partials for _attn_combine."""
    # last query tiles first: under a causal mask they stream the most keys (shorter tail)
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    kv_start = tl.load(KV_START + off_b) if HAS_KV_START else 0

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=offs_m[:, None] < SQ, other=0.0)
    q_pos = offs_m + (SK - SQ)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp(x) = exp2(x · log2(e))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo = pid_s * SPLIT_SIZE
    mid, hi = _key_tiles(start_m, lo, tl.minimum(lo + SPLIT_SIZE, SK), SQ, SK, CAUSAL, HAS_KV_START,
                         BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, q_pos, lo, mid, SK, kv_start,
                               qk_scale, False, CAUSAL, HAS_KV_START, BLOCK_N, HEAD_DIM)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, q_pos, mid, hi, SK, kv_start,
                               qk_scale, True, CAUSAL, HAS_KV_START, BLOCK_N, HEAD_DIM)

    # a row with no visible key (possible only within one split) yields o = 0 and lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    rows = pid_bh * SQ + offs_m
    o_ptrs = O + pid_s * stride_os + rows[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=offs_m[:, None] < SQ)
    tl.store(LSE + pid_s * stride_ls + rows, m_i + tl.log2(l_safe), mask=offs_m < SQ)


@triton.jit
def _attn_combine(O_PART, LSE_PART, O, LSE, stride_ps, stride_ls, NUM_SPLITS, HEAD_DIM: tl.constexpr):
    """Merge the per-split (o, lse) of one query row: weights 2^(lse_s - lse)."""
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s in range(NUM_SPLITS):
        lse_s = tl.load(LSE_PART + s * stride_ls + row)
        o_s = tl.load(O_PART + s * stride_ps + row * HEAD_DIM + offs_d)
        m_new = tl.maximum(m, lse_s)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # splits that saw no key weigh 0
        alpha = tl.exp2(m - m_sub)
        w = tl.exp2(lse_s - m_sub)
        acc = acc * alpha + w * o_s
        l = l * alpha + w
        m = m_new
    l = tl.where(l == 0.0, 1.0, l)  # as in _attn_fwd: a row with no visible key gives 0 and -inf
    tl.store(O + row * HEAD_DIM + offs_d, (acc / l).to(O.dtype.element_ty))
    tl.store(LSE + row, m + tl.log2(l))


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, stride_dob, stride_doh, stride_dom, H, SQ,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-backward term shared by every key of a row."""
    pid_bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = pid_bh * SQ + offs_m
    in_rows = offs_m[:, None] < SQ
    o = tl.load(O + rows[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], mask=in_rows, other=0.0)
    DO += (pid_bh // H).to(tl.int64) * stride_dob + (pid_bh % H).to(tl.int64) * stride_doh
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=in_rows, other=0.0)
    tl.store(DELTA + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < SQ)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, stride_qm, stride_dom, k_pos, lo, hi, SQ, SK, kv_start,
                sm_scale, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
                ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Accumulate one key tile's dK, dV over the query tiles [lo, hi). Works on transposed scores
    [BLOCK_N, BLOCK_M] so that no large tile needs a transpose. Query rows past SQ load as zeros
    and contribute nothing. ATOMIC_DQ: also add this key tile's share of dQ into the fp32 DQ_ACC
    (two fewer matmuls than the separate dQ pass, but the summation order varies run to run)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_rows = offs_m < SQ
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=in_rows[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=in_rows[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=in_rows, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=in_rows, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale - lse[None, :])
        if MASKED:
            q_pos = offs_m + (SK - SQ)
            p_t = tl.where(_visible(q_pos[None, :], k_pos[:, None], SK, kv_start, CAUSAL, HAS_KV_START), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision="ieee")
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision="ieee") * sm_scale
            tl.atomic_add(DQ_ACC + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=in_rows[:, None])
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, KV_START, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   H, SQ, SK,
                   CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, HEAD_DIM: tl.constexpr,
                   ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    LSE += pid_bh * SQ
    DELTA += pid_bh * SQ
    DQ_ACC += pid_bh.to(tl.int64) * SQ * HEAD_DIM
    kv_start = tl.load(KV_START + off_b) if HAS_KV_START else 0
    qk_scale = sm_scale * 1.4426950408889634

    k_pos = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_keys = k_pos[:, None] < SK
    k = tl.load(K + k_pos[:, None] * stride_kn + offs_d[None, :], mask=in_keys, other=0.0)
    v = tl.load(V + k_pos[:, None] * stride_vn + offs_d[None, :], mask=in_keys, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # query tiles that see part of this key tile (the diagonal) need the mask; those past it do not
    lo = 0
    mid = 0
    if CAUSAL:
        lo = tl.maximum(start_n - (SK - SQ), 0) // BLOCK_M * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (SK - SQ), 0), BLOCK_M) * BLOCK_M
    if HAS_KV_START:
        mid = SQ
    # a partial last key tile needs the bounds mask against every query tile: its zero-filled keys
    # score 0, and p = exp2(0 - lse) overflows when the real logits are very negative (inf · 0 = NaN)
    mid = tl.where(start_n + BLOCK_N > SK, SQ, tl.minimum(mid, SQ))
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, stride_qm, stride_dom, k_pos, lo, mid, SQ, SK,
                         kv_start, sm_scale, qk_scale, True, CAUSAL, HAS_KV_START, ATOMIC_DQ, BLOCK_M, HEAD_DIM)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, stride_qm, stride_dom, k_pos, mid, SQ, SQ, SK,
                         kv_start, sm_scale, qk_scale, False, CAUSAL, HAS_KV_START, ATOMIC_DQ, BLOCK_M, HEAD_DIM)

    rows = (pid_bh * SK + k_pos)[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + rows, (dk * sm_scale).to(DK.dtype.element_ty), mask=in_keys)
    tl.store(DV + rows, dv.to(DV.dtype.element_ty), mask=in_keys)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, q_pos, lo, hi, SK, kv_start, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n
        k_ptrs = K + k_pos[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V + k_pos[:, None] * stride_vn + offs_d[None, :]
        k = _load_key_rows(k_ptrs, k_pos, SK, MASKED)
        v = _load_key_rows(v_ptrs, k_pos, SK, MASKED)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(q_pos[:, None], k_pos[None, :], SK, kv_start, CAUSAL, HAS_KV_START), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV_START, sm_scale,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                 H, SQ, SK,
                 CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # last query tiles first: under a causal mask they stream the most keys (shorter tail)
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    kv_start = tl.load(KV_START + off_b) if HAS_KV_START else 0
    qk_scale = sm_scale * 1.4426950408889634

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_rows = offs_m < SQ
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=in_rows[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=in_rows[:, None], other=0.0)
    rows = pid_bh * SQ + offs_m
    lse = tl.load(LSE + rows, mask=in_rows, other=0.0)
    delta = tl.load(DELTA + rows, mask=in_rows, other=0.0)
    q_pos = offs_m + (SK - SQ)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    mid, hi = _key_tiles(start_m, 0, SK, SQ, SK, CAUSAL, HAS_KV_START, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, q_pos, 0, mid, SK, kv_start, qk_scale,
                   False, CAUSAL, HAS_KV_START, BLOCK_N, HEAD_DIM)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, q_pos, mid, hi, SK, kv_start, qk_scale,
                   True, CAUSAL, HAS_KV_START, BLOCK_N, HEAD_DIM)
    tl.store(DQ + rows[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=in_rows[:, None])


# ----------------------------------------------------------------------------- launch configs


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (arch, kind, 16-bit dtype?) -> head_dim -> Config. "fwd": training/prefill forward,
# "decode": forward for Sq <= DECODE_MAX_SQ (split-KV), "dkdv" / "dq": the backward.
# fp32 runs exact (ieee) dots on CUDA cores, so its tiles are smaller.
_C = Config
_SMALL_D = (16, 32, 64)
_CONFIGS = {
    (90, "fwd", True): {**dict.fromkeys(_SMALL_D, _C(128, 64, 4, 3)), 128: _C(128, 64, 8, 3)},
    (80, "fwd", True): {16: _C(128, 64, 4, 3), 32: _C(128, 64, 4, 3), 64: _C(128, 64, 8, 3), 128: _C(128, 64, 8, 3)},
    (90, "decode", True): dict.fromkeys(HEAD_DIMS, _C(16, 64, 4, 3)),
    (80, "decode", True): dict.fromkeys(HEAD_DIMS, _C(16, 64, 4, 3)),
    (90, "dkdv", True): {**dict.fromkeys(_SMALL_D, _C(32, 128, 8, 3)), 128: _C(32, 128, 8, 2)},
    (80, "dkdv", True): {**dict.fromkeys(_SMALL_D, _C(32, 128, 8, 3)), 128: _C(32, 64, 8, 3)},
    (90, "dq", True): {**dict.fromkeys(_SMALL_D, _C(128, 64, 4, 3)), 128: _C(128, 64, 8, 2)},
    (80, "dq", True): {**dict.fromkeys(_SMALL_D, _C(128, 32, 4, 3)), 128: _C(128, 32, 8, 2)},
    # fp32: ieee dots on CUDA cores hold whole tiles in registers; 8 warps keep them from spilling
    (90, "fwd", False): {**dict.fromkeys(_SMALL_D, _C(64, 32, 8, 2)), 128: _C(16, 32, 8, 2)},
    (90, "decode", False): dict.fromkeys(HEAD_DIMS, _C(16, 32, 8, 2)),
    (90, "dkdv", False): {**dict.fromkeys(_SMALL_D, _C(32, 32, 8, 2)), 128: _C(16, 32, 4, 2)},
    (90, "dq", False): {**dict.fromkeys(_SMALL_D, _C(32, 32, 4, 2)), 128: _C(16, 32, 4, 2)},
}
for _kind in ("fwd", "decode", "dkdv", "dq"):
    _CONFIGS[(80, _kind, False)] = _CONFIGS[(90, _kind, False)]
ARCHS = (80, 90)
_ROWS_PER_PROGRAM = 64  # preprocess tile height
_KERNELS = {"fwd": _attn_fwd, "decode": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
_VARIANTS = {"dkdv": ({"ATOMIC_DQ": False}, {"ATOMIC_DQ": True})}  # extra constexprs, one build each


def _arch(device: torch.device) -> int:
    """The config table row for a device: 90 for Hopper and newer, else 80 (also the interpreter)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return 90
    return 80


def _config(kind: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> Config:
    return _CONFIGS[(_arch(device), kind, dtype != torch.float32)][head_dim]


def _num_splits(bh: int, m_tiles: int, sk: int, block_n: int, device: torch.device) -> int:
    """Enough key splits for about two programs per SM, each streaming >= _MIN_TILES_PER_SPLIT tiles."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    want = triton.cdiv(2 * sms, bh * m_tiles)
    return max(1, min(want, triton.cdiv(sk, block_n * _MIN_TILES_PER_SPLIT)))


_INT_PARAMS = {"H", "SQ", "SK", "SPLIT_SIZE", "NUM_SPLITS"}
_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_configs() -> list[dict]:
    """Every shipped launch configuration of this module's kernels, for kernels/compile.py.

    Each is compiled in its most general variant (CAUSAL and HAS_KV_START on: both the unmasked
    and the masked loops, plus the padding mask), for bf16 and fp32; fp16 shares bf16's configs."""
    out = []
    for dtype in (torch.bfloat16, torch.float32):  # fp16 builds the same code as bf16
        t = _TRITON_TYPE[dtype]
        for head_dim in HEAD_DIMS:
            flags = {"CAUSAL": True, "HAS_KV_START": True, "HEAD_DIM": head_dim}
            for kind, fn in _KERNELS.items():
                for arch, variant in itertools.product(ARCHS, _VARIANTS.get(kind, ({},))):
                    c = _CONFIGS[(arch, kind, dtype != torch.float32)][head_dim]
                    # the decode forward writes fp32 partials when it splits the keys
                    sig = _signature(fn, t, "fp32" if kind == "decode" else t)
                    out.append({
                        "kernel": f"attn_{kind}" + ("_atomic" if variant.get("ATOMIC_DQ") else ""),
                        "fn": fn, "signature": sig,
                        "constexprs": {**flags, **variant, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
                        "num_warps": c.num_warps, "num_stages": c.num_stages, "archs": (arch,),
                        # Hopper tensor cores for the 16-bit matmul kernels; decode tiles are 16 rows
                        "wgmma": dtype != torch.float32 and kind != "decode",
                        "config": f"D={head_dim} {t} BM={c.block_m} BN={c.block_n} w{c.num_warps} s{c.num_stages}",
                    })
            for fn, name, constexprs, warps in (
                (_attn_bwd_preprocess, "attn_bwd_pre", {"HEAD_DIM": head_dim, "BLOCK_M": _ROWS_PER_PROGRAM}, 4),
                (_attn_combine, "attn_combine", {"HEAD_DIM": head_dim}, 1),
            ):
                out.append({
                    "kernel": name, "fn": fn, "signature": _signature(fn, t, t), "constexprs": constexprs,
                    "num_warps": warps, "num_stages": 1, "archs": ARCHS, "wgmma": False,
                    "config": f"D={head_dim} {t} w{warps}",
                })
    return out


def _signature(fn, t: str, out_t: str) -> dict:
    """Triton types of fn's parameters: Q/K/V/... of dtype t, O of out_t, fp32 statistics,
    int64 kv_start, i32 sizes and strides."""
    types = {"LSE": "*fp32", "DELTA": "*fp32", "DQ_ACC": "*fp32", "O_PART": "*fp32", "LSE_PART": "*fp32",
             "KV_START": "*i64",
             "O": f"*{out_t}", "sm_scale": "fp32"}
    sig = {}
    for name, p in inspect.signature(fn.fn).parameters.items():  # fn.fn: the Python function, also interpreted
        if p.annotation is tl.constexpr:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:
            sig[name] = "i32" if name.startswith("stride") or name in _INT_PARAMS else f"*{t}"
    return sig


# ----------------------------------------------------------------------------- launcher


def _check_inputs(q, k, v, kv_start):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"flash_attention: {name}.dtype must be one of {DTYPES}, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
                         f"on {q.device}/{k.device}/{v.device}")
    (b, h, sq, d), sk = q.shape, k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(f"flash_attention: k and v must be [B, H, Sk, D] = [{b}, {h}, Sk, {d}], "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if d not in HEAD_DIMS:
        raise ValueError(f"flash_attention: head dim D must be one of {HEAD_DIMS}, got {d}")
    if not 1 <= sq <= sk:
        raise ValueError(f"flash_attention: needs 1 <= Sq <= Sk, got Sq={sq}, Sk={sk}")
    if kv_start is not None and (kv_start.shape != (b,) or kv_start.dtype != torch.int64
                                 or kv_start.device != q.device):
        raise ValueError(f"flash_attention: kv_start must be a LongTensor of shape [B] = [{b}] on {q.device}, "
                         f"got {kv_start.dtype} {tuple(kv_start.shape)} on {kv_start.device}")


def _inner_contiguous(t):
    """Any strides are fine except along D, which the kernels read as contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q, k, v, causal, sm_scale, kv_start):
    """Returns o [B, H, Sq, D] (contiguous, q's dtype) and lse [B·H, Sq] (fp32, base 2)."""
    (b, h, sq, d), sk, dev = q.shape, k.shape[2], q.device
    kind = "decode" if sq <= DECODE_MAX_SQ else "fwd"
    c = _config(kind, d, q.dtype, dev)
    m_tiles = triton.cdiv(sq, c.block_m)
    splits = _num_splits(b * h, m_tiles, sk, c.block_n, dev) if kind == "decode" else 1
    split_size = triton.cdiv(triton.cdiv(sk, splits), c.block_n) * c.block_n
    splits = triton.cdiv(sk, split_size)
    o = torch.empty((b, h, sq, d), dtype=q.dtype, device=dev)
    lse = torch.empty((b * h, sq), dtype=torch.float32, device=dev)
    if splits == 1:
        o_part, lse_part = o, lse
    else:
        o_part = torch.empty((splits, b * h * sq, d), dtype=torch.float32, device=dev)
        lse_part = torch.empty((splits, b * h * sq), dtype=torch.float32, device=dev)
    _attn_fwd[(m_tiles, b * h, splits)](
        q, k, v, o_part, lse_part, q if kv_start is None else kv_start, sm_scale,  # (q: unused pointer)
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], b * h * sq * d, b * h * sq,
        h, sq, sk, split_size,
        CAUSAL=causal, HAS_KV_START=kv_start is not None, HEAD_DIM=d, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
    if splits > 1:
        _attn_combine[(b * h * sq,)](o_part, lse_part, o, lse, b * h * sq * d, b * h * sq, splits,
                                     HEAD_DIM=d, num_warps=1)
    return o, lse


def _backward(do, q, k, v, o, lse, causal, sm_scale, kv_start, deterministic):
    (b, h, sq, d), sk, dev = q.shape, k.shape[2], q.device
    delta = torch.empty((b * h, sq), dtype=torch.float32, device=dev)
    _attn_bwd_preprocess[(triton.cdiv(sq, _ROWS_PER_PROGRAM), b * h)](
        o, do, delta, *do.stride()[:3], h, sq, HEAD_DIM=d, BLOCK_M=_ROWS_PER_PROGRAM, num_warps=4)
    dk = torch.empty((b, h, sk, d), dtype=k.dtype, device=dev)
    dv = torch.empty((b, h, sk, d), dtype=v.dtype, device=dev)
    common = dict(CAUSAL=causal, HAS_KV_START=kv_start is not None, HEAD_DIM=d)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    kv = q if kv_start is None else kv_start  # unused pointers get any tensor
    dq_acc = delta if deterministic else torch.zeros((b, h, sq, d), dtype=torch.float32, device=dev)
    c = _config("dkdv", d, q.dtype, dev)
    _attn_bwd_dkdv[(triton.cdiv(sk, c.block_n), b * h)](
        q, k, v, do, lse, delta, dk, dv, dq_acc, kv, sm_scale, *strides, h, sq, sk, **common,
        ATOMIC_DQ=not deterministic, BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps,
        num_stages=c.num_stages)
    if not deterministic:
        return dq_acc.to(q.dtype), dk, dv
    dq = torch.empty((b, h, sq, d), dtype=q.dtype, device=dev)
    c = _config("dq", d, q.dtype, dev)
    _attn_bwd_dq[(triton.cdiv(sq, c.block_m), b * h)](
        q, k, v, do, lse, delta, dq, kv, sm_scale, *strides, h, sq, sk, **common,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, kv_start, deterministic):
        q, k, v = (_inner_contiguous(t) for t in (q, k, v))
        o, lse = _forward(q, k, v, causal, sm_scale, kv_start)
        ctx.save_for_backward(q, k, v, o, lse, kv_start)
        ctx.causal, ctx.sm_scale, ctx.deterministic = causal, sm_scale, deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_start = ctx.saved_tensors
        dq, dk, dv = _backward(_inner_contiguous(do), q, k, v, o, lse, ctx.causal, ctx.sm_scale, kv_start,
                               ctx.deterministic)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------- public


def flash_attention(q, k, v, causal=True, sm_scale=None, kv_start=None, deterministic=True):
    """softmax(q kᵀ · sm_scale + mask) v with q: [B, H, Sq, D], k, v: [B, H, Sk, D], Sk >= Sq.

    causal: bottom-right aligned (query i sees keys j <= i + Sk - Sq). sm_scale defaults to
    1/sqrt(D). kv_start: optional LongTensor[B], the first real position of each left-padded row
    (see engine/reference.py: attention_mask). D in HEAD_DIMS; fp16, bf16 or fp32; any strides.
    Differentiable in q, k, v. deterministic=True (default): bitwise-equal gradients run after
    run (dQ in its own pass); False: dQ accumulated with fp32 atomics in the dK/dV pass, which
    saves two of the backward's seven matmuls.
    """
    _check_inputs(q, k, v, kv_start)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return FlashAttention.apply(q, k, v, bool(causal), sm_scale, kv_start, bool(deterministic))
