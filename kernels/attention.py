"""Flash attention in Triton: forward, backward, and flash-decoding over a KV cache.

    o = softmax(q kᵀ · sm_scale + mask) v,   q: [B, H, Sq, D], k, v: [B, Hkv, Sk, D], Sk >= Sq

Grouped-query attention (GQA): Hkv divides H and query head h reads K/V head h // GROUP, GROUP =
H / Hkv, by offsetting its K/V pointers (GROUP is a runtime argument, not a specialisation: Hkv = H
is the group of one). K/V are never repeated in memory.

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
key tile over the query tiles (under GQA, one share per query head, which the launcher then sums
over the group in a fixed order), a second one computes dQ per query tile over the key tiles.
Every gradient element is written by exactly one program that sums in a fixed order, so the
gradients are deterministic (bitwise equal run after run) without atomics. The price is
recomputing Q Kᵀ and dO Vᵀ in the dQ pass (7 matmuls instead of 5); deterministic=False opts
into FlashAttention-2's scheme instead: the dK/dV kernel adds dQ with fp32 atomics (relaxed: no
fences, since only the next launch reads the sums).

Decode (Sq <= 16): one query tile per head would use B·H programs, too few to fill a GPU at
batch 1. The keys are split across programs (flash-decoding); each writes its normalised partial
output and logsumexp, and a small kernel combines them. A program that would see 4 key tiles or
fewer is not split (one launch, as FlashAttention-3 decides).

On sm_90 the 16-bit forward's K and V tiles come by TMA: host-side tensor descriptors over
[B, Hkv, Sk, D], the copy engine zero-filling rows past the end (cp.async.bulk.tensor); a view whose
start or strides are not 16-byte aligned, fp32, decode, and sm_80 load them through pointers. The
interpreter runs descriptors too, so the sm_90 table's parity tests cover that path. There the unmasked
key tiles also run software-pipelined (_fwd_tiles_overlapped): the next tile's QKᵀ stays in flight on
the tensor cores while the softmax of the current one runs (the PTX keeps that wgmma group running
past the exponentials; kernels/compile.py checks it and that ptxas does not serialize it).

Launch configs come from one table, kernels/attention_configs.json (loaded into _CONFIGS), per
arch (sm_80 / sm_90+), kind, 16-bit or fp32, and head dim; no autotuning at run time: the table is
tuned offline (benchmarks/tune_attention.py). The interpreter runs the sm_80 table, or the sm_90 one under
LLM_ENGINE_ATTN_ARCH=90 (its tiles' parity tests). The launches (kernel, grid, arguments, constexprs, warps, stages)
are computed by _forward_launches / _backward_launches, which read no data: `aot_configs()` runs
them on meta tensors, so kernels/compile.py builds exactly the kernels that run, and the custom ops
(llm_engine::flash_attention, flash_attention_backward) run them on fake tensors as their fake
implementations. Sizes (B·H, Sq, Sk) are not specialised, so the first call of each (kernel, D,
dtype, causal, kv_start) JIT-compiles it (about 1-6 s per kernel on a 2-core CPU, fp32 the
slowest; a training step compiles three kernels, a decode step one or two) and later calls with
any sizes reuse it.

Grids are (B·H, tiles, splits): B·H on axis x, where CUDA allows 2^31 - 1 programs (axes y and
z stop at 65,535, which caps a sequence at 65,535 tiles). Offsets: batch/head bases and each
tile's first row are 64-bit, since they pass 2^31 once one tensor does; offsets within a tile and
sequence positions stay 32-bit. K and V share one set of strides, so one tile of in-tile offsets
addresses both: holding a second one across the key loop made the D=128 forward spill registers.

fp32 inputs use exact fp32 dots (input_precision="ieee", CUDA cores), not TF32: slower, but
fp32 means fp32 accuracy here. fp16 / bf16 use tensor cores with fp32 accumulation.
"""
import itertools
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.launch import Launch, checked_grid, kernel_op

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DECODE_MAX_SQ = 16  # queries per step at or below which the decode (split-KV) path is taken
_MIN_TILES_PER_SPLIT = 2  # a split streams at least this many key tiles
_MAX_UNSPLIT_TILES = 4  # a program that sees at most this many key tiles is not split (FlashAttention-3's rule)


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
def _tile_ptrs(base, start, stride, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Pointers to rows [start, start + ROWS) of a [S, HEAD_DIM] matrix with row stride `stride`.
    start · stride is 64-bit: it passes 2^31 once one tensor does (a long sequence in a [B, S, H, D]
    view). Offsets within the tile stay 32-bit: ROWS · stride is far below 2^31."""
    rows = tl.arange(0, ROWS)
    return base + tl.cast(start, tl.int64) * stride + (rows[:, None] * stride + tl.arange(0, HEAD_DIM)[None, :])


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
def _fwd_key_rows(K, start_n, stride_kn, off_b, off_hkv, k_pos, SK, MASKED: tl.constexpr, TMA: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Key rows [start_n, +BLOCK_N) of K or V for the forward. TMA: K is a [B, Hkv, Sk, D] tensor
    descriptor and the copy engine fetches the tile (cp.async.bulk.tensor), zero-filling rows past
    the tensor's end; rows past SK but inside it (a whole cache read up to kv_lens) are zeroed here
    as the pointer path's mask zeroes them (a stale NaN there would reach O through 0 · NaN).
    Else K points at this (batch, K/V head)'s rows."""
    if TMA:
        tile = K.load([off_b, off_hkv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        if MASKED:
            tile = tl.where(k_pos[:, None] < SK, tile, 0.0)
    else:
        tile = _load_key_rows(_tile_ptrs(K, start_n, stride_kn, BLOCK_N, HEAD_DIM), k_pos, SK, MASKED)
    return tile


@triton.jit
def _softmax_step(qk, m_i, l_i, MASKED: tl.constexpr):
    """Online softmax of one tile of scaled scores qk [BLOCK_M, BLOCK_N]: its probabilities p relative
    to the new row max, the factor alpha that rescales what was accumulated before, and the new m, l."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_sub = m_new
    if MASKED:
        # a row that has seen no visible key yet keeps m = -inf; subtracting 0 keeps it NaN-free
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kn, off_b, off_hkv, q_pos, lo, hi, SK, kv_start, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, TMA: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n
        k = _fwd_key_rows(K, start_n, stride_kn, off_b, off_hkv, k_pos, SK, MASKED, TMA, BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        if MASKED:
            qk = tl.where(_visible(q_pos[:, None], k_pos[None, :], SK, kv_start, CAUSAL, HAS_KV_START),
                          qk, float("-inf"))
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, MASKED)
        v = _fwd_key_rows(V, start_n, stride_kn, off_b, off_hkv, k_pos, SK, MASKED, TMA, BLOCK_N, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, l_i, m_i


@triton.jit
def _fwd_tiles_overlapped(acc, l_i, m_i, q, K, V, stride_kn, off_b, off_hkv, lo, hi, SK, qk_scale,
                          TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """_fwd_tiles over unmasked key tiles [lo, hi), at least two, with the next tile's QKᵀ running on
    the tensor cores while this tile's softmax runs (FlashAttention-3's intra-warpgroup overlap; sm_90).

    Triton leaves a wgmma in flight past its issue only if its result is just carried to the next
    iteration and read there after a wait for every wgmma (WGMMAPipeline.cpp, "properly async"); the
    P·V product, whose P comes from registers, always ends in such a wait. So iteration i (tile i)
    runs: P·V of tile i - 1 (its wait also completes tile i's scores), QKᵀ of tile i + 1 (left
    running), softmax of tile i; its P goes to iteration i + 1. The scores are scaled into new
    registers before the next QKᵀ is issued, by an fma that the compiler cannot fuse into the softmax's
    subtraction: reading them after the issue (as a fused fma(qk, scale, -m) would) keeps them live
    beside the new accumulator, the loop's back edge then copies that accumulator while it is still
    being written, and ptxas serializes every wgmma (its C7514 note; kernels/compile.py checks)."""
    offs_n = tl.arange(0, BLOCK_N)  # (unmasked loads read no positions)
    k = _fwd_key_rows(K, lo, stride_kn, off_b, off_hkv, offs_n, SK, False, TMA, BLOCK_N, HEAD_DIM)
    p, alpha, m_i, l_i = _softmax_step(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale, m_i, l_i, False)
    acc = acc * alpha[:, None]
    k = _fwd_key_rows(K, lo + BLOCK_N, stride_kn, off_b, off_hkv, offs_n, SK, False, TMA, BLOCK_N, HEAD_DIM)
    qk = tl.dot(q, tl.trans(k), input_precision="ieee")  # tile 1's raw scores
    for start_n in range(lo + BLOCK_N, hi - BLOCK_N, BLOCK_N):
        v = _fwd_key_rows(V, start_n - BLOCK_N, stride_kn, off_b, off_hkv, offs_n, SK, False, TMA, BLOCK_N, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        qk = tl.fma(qk, qk_scale, 0.0)
        k = _fwd_key_rows(K, start_n + BLOCK_N, stride_kn, off_b, off_hkv, offs_n, SK, False, TMA, BLOCK_N, HEAD_DIM)
        qk_next = tl.dot(q, tl.trans(k), input_precision="ieee")
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, False)
        acc = acc * alpha[:, None]
        qk = qk_next
    # the last two tiles: P·V of the one before last; softmax and P·V of the last
    v = _fwd_key_rows(V, hi - 2 * BLOCK_N, stride_kn, off_b, off_hkv, offs_n, SK, False, TMA, BLOCK_N, HEAD_DIM)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    p, alpha, m_i, l_i = _softmax_step(qk * qk_scale, m_i, l_i, False)
    v = _fwd_key_rows(V, hi - BLOCK_N, stride_kn, off_b, off_hkv, offs_n, SK, False, TMA, BLOCK_N, HEAD_DIM)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, l_i, m_i


# Sizes are not specialised (do_not_specialize): one build serves every sequence length and head
# count (Triton would compile other variants for values divisible by 16 or equal to 1), so the
# first call compiles and kernels/compile.py can list every build that runs.
@triton.jit(do_not_specialize=["ROWS", "H", "GROUP", "SQ", "SK"])
def _attn_fwd(Q, K, V, O, LSE, KV_START, KV_LENS, sm_scale,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              ROWS, H, GROUP, SQ, SK, SPLIT_SIZE,
              CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_KV_LENS: tl.constexpr, TMA: tl.constexpr,
              OVERLAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile against the keys [split · SPLIT_SIZE, +SPLIT_SIZE) (V has K's strides). O and LSE are
    [splits, ROWS = B·H·SQ, (D)]: with one split they are the result, else partials for _attn_combine.
    Query head h reads K/V head h // GROUP (GROUP = H / Hkv query heads share one K/V head).
    HAS_KV_LENS: K and V are a whole preallocated cache and row b holds KV_LENS[b] keys, read from
    memory so that a captured decode step replays at every length (splits past it see no key).
    TMA: K and V are [B, Hkv, Sk, D] tensor descriptors (sm_90: the copy engine loads the key tiles)."""
    pid_bh = tl.program_id(0)
    # last query tiles first: under a causal mask they stream the most keys (shorter tail)
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    pid_s = tl.program_id(2)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = (pid_bh % H // GROUP).to(tl.int64)  # the query head's K/V head
    Q += off_b * stride_qb + off_h * stride_qh
    if not TMA:
        K += off_b * stride_kb + off_hkv * stride_kh
        V += off_b * stride_kb + off_hkv * stride_kh
    kv_start = tl.load(KV_START + off_b) if HAS_KV_START else 0
    if HAS_KV_LENS:
        SK = tl.load(KV_LENS + off_b).to(tl.int32)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    in_rows = offs_m < SQ
    q = tl.load(_tile_ptrs(Q, start_m, stride_qm, BLOCK_M, HEAD_DIM), mask=in_rows[:, None], other=0.0)
    q_pos = offs_m + (SK - SQ)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp(x) = exp2(x · log2(e))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo = pid_s * SPLIT_SIZE
    mid, hi = _key_tiles(start_m, lo, tl.minimum(lo + SPLIT_SIZE, SK), SQ, SK, CAUSAL, HAS_KV_START,
                         BLOCK_M, BLOCK_N)
    # (a descriptor's coordinates are 32-bit: batch and head indices are far below 2^31)
    desc_b, desc_h = (pid_bh // H), (pid_bh % H // GROUP)
    if OVERLAP:
        if mid - lo >= 2 * BLOCK_N:
            acc, l_i, m_i = _fwd_tiles_overlapped(acc, l_i, m_i, q, K, V, stride_kn, desc_b, desc_h, lo, mid, SK,
                                                  qk_scale, TMA, BLOCK_N, HEAD_DIM)
        else:
            mid = lo  # a single unmasked tile joins the masked ones
    else:
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kn, desc_b, desc_h, q_pos, lo, mid, SK, kv_start,
                                   qk_scale, False, CAUSAL, HAS_KV_START, TMA, BLOCK_N, HEAD_DIM)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kn, desc_b, desc_h, q_pos, mid, hi, SK, kv_start,
                               qk_scale, True, CAUSAL, HAS_KV_START, TMA, BLOCK_N, HEAD_DIM)

    # a row with no visible key (possible only within one split) yields o = 0 and lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    first_row = pid_s.to(tl.int64) * ROWS + pid_bh.to(tl.int64) * SQ + start_m
    o_ptrs = _tile_ptrs(O, first_row, HEAD_DIM, BLOCK_M, HEAD_DIM)
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=in_rows[:, None])
    tl.store(LSE + first_row + tl.arange(0, BLOCK_M), m_i + tl.log2(l_safe), mask=in_rows)


@triton.jit(do_not_specialize=["ROWS", "NUM_SPLITS"])
def _attn_combine(O_PART, LSE_PART, O, LSE, ROWS, NUM_SPLITS, HEAD_DIM: tl.constexpr):
    """Merge the per-split (o, lse) of one query row: weights 2^(lse_s - lse)."""
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s in range(NUM_SPLITS):
        part_row = tl.cast(s, tl.int64) * ROWS + row
        lse_s = tl.load(LSE_PART + part_row)
        o_s = tl.load(O_PART + part_row * HEAD_DIM + offs_d)
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


@triton.jit(do_not_specialize=["H", "SQ"])
def _attn_bwd_preprocess(O, DO, DELTA, stride_dob, stride_doh, stride_dom, H, SQ,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-backward term shared by every key of a row."""
    pid_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    in_rows = start_m + tl.arange(0, BLOCK_M) < SQ
    first_row = pid_bh.to(tl.int64) * SQ + start_m
    o = tl.load(_tile_ptrs(O, first_row, HEAD_DIM, BLOCK_M, HEAD_DIM), mask=in_rows[:, None], other=0.0)
    DO += (pid_bh // H).to(tl.int64) * stride_dob + (pid_bh % H).to(tl.int64) * stride_doh
    do = tl.load(_tile_ptrs(DO, start_m, stride_dom, BLOCK_M, HEAD_DIM), mask=in_rows[:, None], other=0.0)
    tl.store(DELTA + first_row + tl.arange(0, BLOCK_M), tl.sum(o.to(tl.float32) * do.to(tl.float32), 1),
             mask=in_rows)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, stride_qm, stride_dom, k_pos, lo, hi, SQ, SK, kv_start,
                sm_scale, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
                ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Accumulate one key tile's dK, dV over the query tiles [lo, hi). Works on transposed scores
    [BLOCK_N, BLOCK_M] so that no large tile needs a transpose. Query rows past SQ load as zeros
    and contribute nothing. ATOMIC_DQ: also add this key tile's share of dQ into the fp32 DQ_ACC
    (two fewer matmuls than the separate dQ pass, but the summation order varies run to run)."""
    nonempty = lo < hi  # (an empty range skips the loop's final wgmma wait too: see _dq_tiles)
    if k.dtype == tl.float32:
        nonempty = True
    if nonempty:
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            in_rows = offs_m < SQ
            q = tl.load(_tile_ptrs(Q, start_m, stride_qm, BLOCK_M, HEAD_DIM), mask=in_rows[:, None], other=0.0)
            do = tl.load(_tile_ptrs(DO, start_m, stride_dom, BLOCK_M, HEAD_DIM), mask=in_rows[:, None], other=0.0)
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
                # relaxed: nothing in the kernel reads DQ_ACC, and the kernel's end orders the sums
                # before the launcher reads them (acq_rel, the default, fences every add for nothing)
                tl.atomic_add(_tile_ptrs(DQ_ACC, start_m, HEAD_DIM, BLOCK_M, HEAD_DIM), dq, mask=in_rows[:, None],
                              sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["H", "GROUP", "SQ", "SK"])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, KV_START, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_dob, stride_doh, stride_dom,
                   H, GROUP, SQ, SK,
                   CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, HEAD_DIM: tl.constexpr,
                   ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key tile's dK, dV from one query head (grid B·H × key tiles), read from K/V head h // GROUP.
    DK, DV are [B·H, SK, D]: with GROUP = 1 the gradients themselves, else one partial per query head
    that the launcher sums over each group (see _backward_launches)."""
    pid_bh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = (pid_bh % H // GROUP).to(tl.int64)  # the query head's K/V head
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_hkv * stride_kh
    V += off_b * stride_kb + off_hkv * stride_kh
    DO += off_b * stride_dob + off_h * stride_doh
    LSE += pid_bh.to(tl.int64) * SQ
    DELTA += pid_bh.to(tl.int64) * SQ
    DQ_ACC += pid_bh.to(tl.int64) * SQ * HEAD_DIM
    kv_start = tl.load(KV_START + off_b) if HAS_KV_START else 0
    qk_scale = sm_scale * 1.4426950408889634

    k_pos = start_n + tl.arange(0, BLOCK_N)
    in_keys = k_pos[:, None] < SK
    k = tl.load(_tile_ptrs(K, start_n, stride_kn, BLOCK_N, HEAD_DIM), mask=in_keys, other=0.0)
    v = tl.load(_tile_ptrs(V, start_n, stride_kn, BLOCK_N, HEAD_DIM), mask=in_keys, other=0.0)
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

    first_row = pid_bh.to(tl.int64) * SK + start_n
    tl.store(_tile_ptrs(DK, first_row, HEAD_DIM, BLOCK_N, HEAD_DIM), (dk * sm_scale).to(DK.dtype.element_ty),
             mask=in_keys)
    tl.store(_tile_ptrs(DV, first_row, HEAD_DIM, BLOCK_N, HEAD_DIM), dv.to(DV.dtype.element_ty), mask=in_keys)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, stride_kn, q_pos, lo, hi, SK, kv_start, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    # An empty range skips the loop's final wgmma wait as well: else the path around the loop defines the
    # accumulator (its initial value) before a wait for it, and ptxas serializes every wgmma (C7515).
    # fp32 (no wgmma) keeps the bare loop: the guard made some sm_80 fp32 builds spill 8-16 B.
    nonempty = lo < hi
    if q.dtype == tl.float32:
        nonempty = True
    if nonempty:
        for start_n in range(lo, hi, BLOCK_N):
            k_pos = start_n + offs_n
            k = _load_key_rows(_tile_ptrs(K, start_n, stride_kn, BLOCK_N, HEAD_DIM), k_pos, SK, MASKED)
            v = _load_key_rows(_tile_ptrs(V, start_n, stride_kn, BLOCK_N, HEAD_DIM), k_pos, SK, MASKED)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse[:, None])
            if MASKED:
                p = tl.where(_visible(q_pos[:, None], k_pos[None, :], SK, kv_start, CAUSAL, HAS_KV_START), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
    return dq


@triton.jit(do_not_specialize=["H", "GROUP", "SQ", "SK"])
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV_START, sm_scale,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_dob, stride_doh, stride_dom,
                 H, GROUP, SQ, SK,
                 CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    # last query tiles first: under a causal mask they stream the most keys (shorter tail)
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    off_hkv = (pid_bh % H // GROUP).to(tl.int64)  # the query head's K/V head
    K += off_b * stride_kb + off_hkv * stride_kh
    V += off_b * stride_kb + off_hkv * stride_kh
    DO += off_b * stride_dob + off_h * stride_doh
    kv_start = tl.load(KV_START + off_b) if HAS_KV_START else 0
    qk_scale = sm_scale * 1.4426950408889634

    offs_m = start_m + tl.arange(0, BLOCK_M)
    in_rows = offs_m < SQ
    q = tl.load(_tile_ptrs(Q, start_m, stride_qm, BLOCK_M, HEAD_DIM), mask=in_rows[:, None], other=0.0)
    do = tl.load(_tile_ptrs(DO, start_m, stride_dom, BLOCK_M, HEAD_DIM), mask=in_rows[:, None], other=0.0)
    first_row = pid_bh.to(tl.int64) * SQ + start_m
    lse = tl.load(LSE + first_row + tl.arange(0, BLOCK_M), mask=in_rows, other=0.0)
    delta = tl.load(DELTA + first_row + tl.arange(0, BLOCK_M), mask=in_rows, other=0.0)
    q_pos = offs_m + (SK - SQ)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    mid, hi = _key_tiles(start_m, 0, SK, SQ, SK, CAUSAL, HAS_KV_START, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, stride_kn, q_pos, 0, mid, SK, kv_start, qk_scale,
                   False, CAUSAL, HAS_KV_START, BLOCK_N, HEAD_DIM)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, stride_kn, q_pos, mid, hi, SK, kv_start, qk_scale,
                   True, CAUSAL, HAS_KV_START, BLOCK_N, HEAD_DIM)
    tl.store(_tile_ptrs(DQ, first_row, HEAD_DIM, BLOCK_M, HEAD_DIM), (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=in_rows[:, None])


# ----------------------------------------------------------------------------- launch configs


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


ARCHS = (80, 90)
# "fwd": training/prefill forward, "decode": forward for Sq <= DECODE_MAX_SQ (split-KV), "dkdv" / "dq":
# the deterministic backward, "dkdv_atomic": the dK/dV kernel that also adds dQ (deterministic=False).
KINDS = ("fwd", "decode", "dkdv", "dkdv_atomic", "dq")
DTYPE_CLASSES = {"16-bit": True, "fp32": False}  # the table's names for "runs 16-bit tensor-core dots"
# The launch configs, one entry per (arch, kind, dtype class, head dim), with each entry's tuning space
# ("candidates": [BLOCK_M, BLOCK_N, warps, stages] that compile without spills under Triton 3.6 and 3.9).
# Until a GPU has measured them the entries are the anchor-derived configs that compile without spills
# under both versions (python -m kernels.compile); benchmarks/tune_attention.py (gpu_suite.sh --tune)
# times the candidates on a GPU and rewrites the entries of that GPU's arch with the winners.
CONFIG_TABLE = Path(__file__).with_name("attention_configs.json")
_CONFIG_FIELDS = ("block_m", "block_n", "num_warps", "num_stages")
_KEY_FIELDS = ("arch", "kind", "dtype", "head_dim")


def config_problem(c) -> str:
    """Why c (a Config or its 4 numbers) cannot be a launch config, or "" when it can."""
    if not (isinstance(c, (list, tuple)) and len(c) == 4 and all(type(v) is int for v in c)):
        return f"needs 4 integers [block_m, block_n, num_warps, num_stages], got {c!r}"
    block_m, block_n, warps, stages = c
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if v < 16 or v & (v - 1):  # tl.dot needs 16 or more rows and columns; tl.arange powers of two
            return f"{name} must be a power of two >= 16, got {v}"
    if warps not in (1, 2, 4, 8, 16):
        return f"num_warps must be 1, 2, 4, 8 or 16, got {warps}"
    if not 1 <= stages <= 8:
        return f"num_stages must be 1..8, got {stages}"
    return ""


def load_configs(path=CONFIG_TABLE) -> dict:
    """{(arch, kind, 16-bit?): {head_dim: Config}} from the JSON table at path. A ValueError names the
    file and the entry when the file is missing or unreadable, an entry is malformed or repeated, or
    an (arch, kind, dtype class, head dim) has no entry: the launchers must never guess a config."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())["entries"]
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (the attention launch-config table)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a config table with a list of entries ({type(err).__name__}: {err})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: 'entries' must be a list, got {type(entries).__name__}")
    table = {}
    for i, e in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(e, dict) or any(f not in e for f in _KEY_FIELDS + _CONFIG_FIELDS):
            raise ValueError(f"{where}: needs the fields {', '.join(_KEY_FIELDS + _CONFIG_FIELDS)}, got {e!r}")
        where += " (" + " ".join(f"{f}={e[f]}" for f in _KEY_FIELDS) + ")"
        for field, allowed in (("arch", ARCHS), ("kind", KINDS), ("dtype", tuple(DTYPE_CLASSES)), ("head_dim", HEAD_DIMS)):
            if e[field] not in allowed or type(e[field]) is bool:
                raise ValueError(f"{where}: {field} must be one of {allowed}, got {e[field]!r}")
        config = [e[f] for f in _CONFIG_FIELDS]
        for c in (config, *e.get("candidates", ())):
            if problem := config_problem(c):
                raise ValueError(f"{where}: {'config' if c is config else 'candidate'} {problem}")
        per_d = table.setdefault((e["arch"], e["kind"], DTYPE_CLASSES[e["dtype"]]), {})
        if e["head_dim"] in per_d:
            raise ValueError(f"{where}: a second entry for this key")
        per_d[e["head_dim"]] = Config(*config)
    for arch, kind, (dtype, half), d in itertools.product(ARCHS, KINDS, DTYPE_CLASSES.items(), HEAD_DIMS):
        if d not in table.get((arch, kind, half), {}):
            raise ValueError(f"{path}: no entry for arch={arch} kind={kind} dtype={dtype} head_dim={d}")
    return table


_CONFIGS = load_configs()
_ROWS_PER_PROGRAM = 64  # preprocess tile height
# warps of the preprocess and the combine; both run Triton's default stages (no loop worth pipelining)
_PRE_WARPS, _COMBINE_WARPS, _SMALL_STAGES = 4, 1, 3


# Which config table the interpreter (a CPU device) runs: sm_80's unless this variable names another
# arch, so that the sm_90 tiles get parity tests too (tests/test_attention.py). GPUs ignore it.
ARCH_ENV = "LLM_ENGINE_ATTN_ARCH"


def _target(device: torch.device) -> tuple[int, int]:
    """(config table arch, SM count): arch 90 for Hopper and newer, else 80; the interpreter counts
    as arch 80 (or $LLM_ENGINE_ATTN_ARCH) with an H100's 132 SMs."""
    if device.type == "cuda":
        return (90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80,
                torch.cuda.get_device_properties(device).multi_processor_count)
    arch = os.environ.get(ARCH_ENV, "80")
    if arch not in map(str, ARCHS):
        raise ValueError(f"{ARCH_ENV} must be one of {', '.join(map(str, ARCHS))} (the config tables), got {arch!r}")
    return int(arch), 132


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b). Not triton.cdiv: called from Python that one goes through Triton's constexpr
    machinery, and its seven calls were half of a decode step's launch planning."""
    return -(-a // b)


def _num_splits(programs: int, sk: int, block_n: int, num_sms: int) -> int:
    """Enough key splits for about two programs per SM, each streaming >= _MIN_TILES_PER_SPLIT tiles;
    none when a program sees <= _MAX_UNSPLIT_TILES key tiles: there the combine's second launch and
    the fp32 partials' round trip cost more than the idle SMs (FlashAttention-3, hopper/heuristics.h)."""
    tiles = _cdiv(sk, block_n)
    if tiles <= _MAX_UNSPLIT_TILES:
        return 1
    want = _cdiv(2 * num_sms, programs)
    return max(1, min(want, _cdiv(tiles, _MIN_TILES_PER_SPLIT)))


# ----------------------------------------------------------------------------- launcher


def _check_inputs(q, k, v, kv_start, kv_lens):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"flash_attention: {name}.dtype must be one of {DTYPES}, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
                         f"on {q.device}/{k.device}/{v.device}")
    (b, h, sq, d), (hkv, sk) = q.shape, k.shape[1:3]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"flash_attention: k and v must both be [B, Hkv, Sk, D] = [{b}, Hkv, Sk, {d}] "
                         f"(q is {tuple(q.shape)}), got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hkv < 1 or h % hkv:
        raise ValueError(f"flash_attention: the K/V head count Hkv (k.shape[1] = {hkv}) must divide the query "
                         f"head count H (q.shape[1] = {h}) for grouped-query attention")
    if d not in HEAD_DIMS:
        raise ValueError(f"flash_attention: head dim D must be one of {HEAD_DIMS}, got {d}")
    if not 1 <= sq <= sk:
        raise ValueError(f"flash_attention: needs 1 <= Sq <= Sk, got Sq={sq}, Sk={sk}")
    for name, t in (("kv_start", kv_start), ("kv_lens", kv_lens)):
        if t is not None and (t.shape != (b,) or t.dtype != torch.int64 or t.device != q.device):
            raise ValueError(f"flash_attention: {name} must be a LongTensor of shape [B] = [{b}] on {q.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if kv_lens is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("flash_attention: kv_lens (a whole preallocated KV cache) is for inference; "
                         "its backward is not implemented: call it under torch.no_grad()")


def _inner_contiguous(t):
    """Any strides are fine except along D, which the kernels read as contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_layout(q, k, v):
    """q, k, v as the kernels read them: contiguous along D, and K and V with the same strides
    (copied to one layout when they differ), so that one tile of offsets addresses both."""
    q, k, v = (_inner_contiguous(t) for t in (q, k, v))
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return q, k, v


# From sm_90 on, the 16-bit forward's K and V tiles come by TMA (tensor descriptors). Not fp32's: its
# CUDA-core tiles already fill the registers, and with TMA's staging its D = 128 builds spilled 176-208 B.
# Not decode's (16-row query tiles): Triton 3.6's ptxas spilled 8-16 B in 18 of its sm_90 builds.
_TMA_ARCH = 90
# There the 16-bit forward also software-pipelines its unmasked key tiles (_fwd_tiles_overlapped) while
# this is True; benchmarks/attention.py times it off too ("ours-plain") until a GPU has measured both.
OVERLAP = True


def _tma_ready(t) -> bool:
    """Whether t [B, Hkv, Sk, D] can back a TMA descriptor: 16-byte aligned start and strides, unit last stride."""
    size = t.element_size()
    if type(t).__name__ in ("FakeTensor", "FunctionalTensor"):  # torch.compile's tracing (as TensorDescriptor tells
        start = t.storage_offset() * size  # them apart): no data pointer; the storage will be allocated aligned
    else:
        start = t.data_ptr()
    return t.stride(-1) == 1 and start % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1])


def _forward_launches(q, k, v, causal, sm_scale, kv_start, arch, num_sms, kv_lens=None):
    """The forward's launches, and its outputs o [B, H, Sq, D] (q's dtype) and lse [B·H, Sq] (fp32,
    base 2) that they will write. Reads no data: kernels/compile.py runs it on meta tensors."""
    (b, h, sq, d), (hkv, sk), dev = q.shape, k.shape[1:3], q.device
    d = int(d)  # a config table key: under torch.compile's symbolic shapes, specialised (a guard)
    kind = "decode" if sq <= DECODE_MAX_SQ else "fwd"
    c = _CONFIGS[(arch, kind, q.dtype != torch.float32)][d]
    m_tiles = _cdiv(sq, c.block_m)
    splits = _num_splits(b * h * m_tiles, sk, c.block_n, num_sms) if kind == "decode" else 1
    split_size = _cdiv(_cdiv(sk, splits), c.block_n) * c.block_n
    splits = _cdiv(sk, split_size)
    rows = b * h * sq
    o = torch.empty((b, h, sq, d), dtype=q.dtype, device=dev)
    lse = torch.empty((b * h, sq), dtype=torch.float32, device=dev)
    if splits == 1:
        o_part, lse_part = o, lse
    else:  # fp32 partials for the combine, in one allocation
        part = torch.empty(splits * rows * (d + 1), dtype=torch.float32, device=dev)
        o_part, lse_part = part[: splits * rows * d].view(splits, rows, d), part[splits * rows * d:].view(splits, rows)
    hopper_fwd = arch >= _TMA_ARCH and kind == "fwd" and q.dtype != torch.float32
    tma = hopper_fwd and _tma_ready(k) and _tma_ready(v)
    overlap = OVERLAP and hopper_fwd and kv_start is None  # (with kv_start every tile is masked: none to overlap)
    keys = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, c.block_n, d]) for t in (k, v)] if tma else [k, v]
    forward = Launch(
        _attn_fwd, checked_grid(b * h, m_tiles, splits),
        (q, *keys, o_part, lse_part, q if kv_start is None else kv_start, q if kv_lens is None else kv_lens,
         sm_scale, *q.stride()[:3], *k.stride()[:3], rows, h, h // hkv, sq, sk, split_size),  # (q: unused pointer)
        dict(CAUSAL=causal, HAS_KV_START=kv_start is not None, HAS_KV_LENS=kv_lens is not None, TMA=tma,
             OVERLAP=overlap, HEAD_DIM=d, BLOCK_M=c.block_m, BLOCK_N=c.block_n),
        c.num_warps, c.num_stages)
    if splits == 1:
        return [forward], o, lse
    combine = Launch(_attn_combine, checked_grid(rows), (o_part, lse_part, o, lse, rows, splits),
                     dict(HEAD_DIM=d), _COMBINE_WARPS, _SMALL_STAGES)
    return [forward, combine], o, lse


def _backward_launches(do, q, k, v, o, lse, causal, sm_scale, kv_start, deterministic, arch):
    """The backward's launches, and dq, dk, dv that they will write (dq in fp32 when not
    deterministic: the atomics' accumulator; dk, dv [B, H, Sk, D], one per query head: with Hkv < H
    partials that _attention_backward sums over each group). Reads no data, like _forward_launches."""
    (b, h, sq, d), (hkv, sk), dev = q.shape, k.shape[1:3], q.device
    d = int(d)  # a config table key: under torch.compile's symbolic shapes, specialised (a guard)
    half = q.dtype != torch.float32
    delta = torch.empty((b * h, sq), dtype=torch.float32, device=dev)
    launches = [Launch(_attn_bwd_preprocess, checked_grid(b * h, _cdiv(sq, _ROWS_PER_PROGRAM)),
                       (o, do, delta, *do.stride()[:3], h, sq), dict(HEAD_DIM=d, BLOCK_M=_ROWS_PER_PROGRAM),
                       _PRE_WARPS, _SMALL_STAGES)]
    # Grouped-query attention: the H / Hkv query heads of a group all add to their K/V head's dK, dV.
    # Each dK/dV program handles one query head, as without groups, and writes that head's share;
    # _attention_backward sums the shares of each group with one torch reduction, in a fixed order:
    # deterministic, no atomics. (One program looping over the group's query heads instead needs no buffer, but
    # holding the loop's state across the query loop made the D=128 16-bit builds spill registers.)
    dk = torch.empty((b, h, sk, d), dtype=k.dtype, device=dev)
    dv = torch.empty((b, h, sk, d), dtype=v.dtype, device=dev)
    if deterministic:
        dq = torch.empty((b, h, sq, d), dtype=q.dtype, device=dev)
    else:
        dq = torch.zeros((b, h, sq, d), dtype=torch.float32, device=dev)
    common = dict(CAUSAL=causal, HAS_KV_START=kv_start is not None, HEAD_DIM=d)
    strides = (*q.stride()[:3], *k.stride()[:3], *do.stride()[:3])
    kv = q if kv_start is None else kv_start  # unused pointers get any tensor
    c = _CONFIGS[(arch, "dkdv" if deterministic else "dkdv_atomic", half)][d]
    launches.append(Launch(
        _attn_bwd_dkdv, checked_grid(b * h, _cdiv(sk, c.block_n)),
        (q, k, v, do, lse, delta, dk, dv, delta if deterministic else dq, kv, sm_scale, *strides, h, h // hkv, sq, sk),
        dict(**common, ATOMIC_DQ=not deterministic, BLOCK_M=c.block_m, BLOCK_N=c.block_n),
        c.num_warps, c.num_stages))
    if deterministic:
        c = _CONFIGS[(arch, "dq", half)][d]
        launches.append(Launch(
            _attn_bwd_dq, checked_grid(b * h, _cdiv(sq, c.block_m)),
            (q, k, v, do, lse, delta, dq, kv, sm_scale, *strides, h, h // hkv, sq, sk),
            dict(**common, BLOCK_M=c.block_m, BLOCK_N=c.block_n), c.num_warps, c.num_stages))
    return launches, dq, dk, dv


# ----------------------------------------------------------------------------- ahead-of-time builds

# Shapes (B, H, Hkv, Sq, Sk) on which the launchers pick every build: training / prefill; a decode step
# at batch 1 over a long cache (split keys, fp32 partials, the combine); one at a large batch (one
# split, written in place); training and decode again with grouped K/V heads. Sizes and the group
# (H / Hkv) are not specialised, so other shapes of each kind pick the same builds (compile.py checks
# that launches sharing a label compile the same source).
_AOT_SHAPES = ((2, 12, 12, 1024, 1024), (1, 12, 12, 1, 4096), (64, 12, 12, 1, 512),
               (2, 32, 8, 1024, 1024), (1, 32, 8, 1, 4096))
_AOT_SMS = {80: 108, 90: 132}  # A100, H100
_AOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_configs() -> list[dict]:
    """Every build the launchers pick, for kernels/compile.py: per arch, dtype and head dim, causal
    or not, with and without kv_start, forward, decode (also over a whole cache: kv_lens, causal) and both
    backward variants. Each entry holds
    the launcher's own Launch, computed on meta tensors (16-byte aligned, like torch's allocations)."""
    out = []
    for arch, dtype, d, causal, padded, (b, h, hkv, sq, sk) in itertools.product(
            ARCHS, _AOT_DTYPES, HEAD_DIMS, (True, False), (False, True), _AOT_SHAPES):
        q, k, v, do = (torch.empty(b, heads, s, d, dtype=dtype, device="meta")
                       for heads, s in ((h, sq), (hkv, sk), (hkv, sk), (h, sq)))
        kv_start = torch.zeros(b, dtype=torch.int64, device="meta") if padded else None
        launches, o, lse = _forward_launches(q, k, v, causal, 1.0, kv_start, arch, _AOT_SMS[arch])
        if causal and sq <= DECODE_MAX_SQ:  # a compiled / graph-captured decode step reads the whole cache
            kv_lens = torch.zeros(b, dtype=torch.int64, device="meta")
            launches += _forward_launches(q, k, v, causal, 1.0, kv_start, arch, _AOT_SMS[arch], kv_lens)[0]
        for deterministic in (True, False):
            launches += _backward_launches(do, q, k, v, o, lse, causal, 1.0, kv_start, deterministic, arch)[0]
        out += [_aot_entry(launch, arch, dtype, "decode" if sq <= DECODE_MAX_SQ else "fwd") for launch in launches]
    return out


# Integer parameters that must enter 64-bit offsets (kernels/compile.py checks each build's PTX):
# the sequence strides (a tile's first row · stride) and the row counts of the flattened outputs.
_WIDE_OFFSETS = {
    _attn_fwd: ("stride_qm", "stride_kn", "ROWS", "SQ"),
    _attn_combine: ("ROWS",),
    _attn_bwd_preprocess: ("stride_dom", "SQ"),
    _attn_bwd_dkdv: ("stride_qm", "stride_kn", "stride_dom", "SQ", "SK"),
    _attn_bwd_dq: ("stride_qm", "stride_kn", "stride_dom", "SQ"),
}


def _aot_entry(launch, arch, dtype, forward_kind):
    c = launch.constexprs
    name = {_attn_fwd: forward_kind, _attn_combine: "combine", _attn_bwd_preprocess: "bwd_pre",
            _attn_bwd_dkdv: "dkdv_atomic" if c.get("ATOMIC_DQ") else "dkdv", _attn_bwd_dq: "dq"}[launch.kernel]
    words = [f"D={c['HEAD_DIM']}", _TRITON_TYPE[dtype]]
    if "CAUSAL" in c:
        words += ["causal" if c["CAUSAL"] else "full"] + ["kv_start"] * c["HAS_KV_START"] + ["kv_lens"] * c.get("HAS_KV_LENS", 0)
    if launch.kernel is _attn_fwd and launch.args[3].dtype != dtype:
        words.append("fp32-partials")
    if "BLOCK_N" in c:
        words += [f"BM={c['BLOCK_M']}", f"BN={c['BLOCK_N']}"]
    words += [f"w{launch.num_warps}", f"s{launch.num_stages}"]
    words += ["tma"] * c.get("TMA", 0) + ["overlap"] * c.get("OVERLAP", 0)
    return {"kernel": f"attn_{name}", "arch": arch, "config": " ".join(words), "launch": launch,
            # (under TMA the key rows' stride is the descriptor's, 64-bit, and the kernel reads no stride_kn)
            "wide": tuple(p for p in _WIDE_OFFSETS[launch.kernel] if not (c.get("TMA") and p == "stride_kn")),
            # Hopper tensor cores for the 16-bit matmul kernels; decode tiles are 16 rows
            "wgmma": arch >= 90 and dtype != torch.float32 and name in ("fwd", "dkdv", "dkdv_atomic", "dq"),
            "overlap": bool(c.get("OVERLAP"))}  # the next QKᵀ in flight during the softmax


# The anchors each kernel is measured against, beside one build of ours (kernels/compile.py prints
# them under its table; "ours": the words of our build's label). Read from their sources:
# FlashAttention-3 hopper/tile_size.h, hopper/flash_bwd_launch_template.h, hopper/heuristics.h; the
# Triton tutorial 06-fused-attention.py.
AOT_ANCHORS = (
    {"kernel": "attn_fwd", "arch": 90, "ours": "D=128 bf16 causal",
     "anchor": "FA3 sm90 D=128: 128x128 causal (128x176 full), TMA for Q/K/V, 2 stages, 2 consumer warpgroups "
               "+ 1 producer (12 warps), P@V from registers, softmax overlapped with the next QK^T (IntraWGOverlap); "
               "tutorial 06: autotuned BM 64/128 x BN 32/64/128, w4/8, s2-4, tensor descriptors on sm_90"},
    {"kernel": "attn_fwd", "arch": 80, "ours": "D=128 bf16 causal",
     "anchor": "FA3's sm8x path D=128 (tile_size_fwd_sm8x): 128x64, 4 warps, 1 stage (8 warps, 128x128 on sm86/89)"},
    {"kernel": "attn_decode", "arch": 90, "ours": "D=128 bf16 causal fp32-partials",
     "anchor": "FA3 num_splits_heuristic: no split when the unsplit grid fills >= 80% of the SMs or a program "
               "sees <= 4 key blocks; else the split count with the best wave efficiency"},
    {"kernel": "attn_dkdv", "arch": 90, "ours": "D=128 bf16 causal",
     "anchor": "FA3 sm90 bwd D=128: BM 64 x BN 128 causal (80x128 full), 2 MMA warpgroups + producer, 2 stages, "
               "dQ by fp32 atomics (no separate pass); tutorial 06: BLOCK_M1 32 x BLOCK_N1 128, w4 s5"},
    {"kernel": "attn_dkdv_atomic", "arch": 90, "ours": "D=128 bf16 causal",
     "anchor": "FA3 sm90 bwd D=128: BM 64 x BN 128 causal, fp32 dQ accumulated with atomic adds, then scaled "
               "and converted by a small kernel"},
    {"kernel": "attn_dq", "arch": 90, "ours": "D=128 bf16 causal",
     "anchor": "tutorial 06 dQ pass: BLOCK_M2 128 x BLOCK_N2 32, w4 s5; FA3 has no separate dQ pass"},
)


# ----------------------------------------------------------------------------- registration
# torch.library.custom_op (kernels/launch.py: kernel_op says why not triton_op). The forward op
# serves prefill, training and decode alike (its launcher picks the split-KV path for Sq <= 16); the
# backward op both variants (deterministic, atomic dQ) and grouped K/V heads.


@kernel_op("flash_attention_backward",
           "(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, float sm_scale, "
           "Tensor? kv_start, bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)")
def _attention_backward(do, q, k, v, o, lse, causal, sm_scale, kv_start, deterministic, run):
    q, k, v = _kernel_layout(q, k, v)  # as the forward read them (copied again if it had to copy)
    launches, dq, dk, dv = _backward_launches(_inner_contiguous(do), q, k, v, o, lse, causal, sm_scale, kv_start,
                                              deterministic, _target(q.device)[0])
    run(launches)
    hkv = k.shape[1]
    if dk.shape[1] != hkv:  # per-query-head shares of grouped K/V heads: summed in fp32, group by group
        dk, dv = (t.unflatten(1, (hkv, -1)).sum(2, dtype=torch.float32).to(t.dtype) for t in (dk, dv))
    return dq.to(q.dtype), dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale, kv_start, kv_lens, deterministic = inputs
    ctx.save_for_backward(q, k, v, *output, kv_start)
    ctx.causal, ctx.sm_scale, ctx.deterministic = causal, sm_scale, deterministic


def _backward(ctx, do, dlse):
    q, k, v, o, lse, kv_start = ctx.saved_tensors
    dq, dk, dv = _attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale, kv_start, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None


@kernel_op("flash_attention",
           "(Tensor q, Tensor k, Tensor v, bool causal, float sm_scale, Tensor? kv_start, Tensor? kv_lens, "
           "bool deterministic) -> (Tensor o, Tensor lse)", _backward, _setup_context)
def _attention(q, k, v, causal, sm_scale, kv_start, kv_lens, deterministic, run):
    """o [B, H, Sq, D] and the row logsumexp lse [B·H, Sq] (fp32, base 2) that the backward reads.
    deterministic is the backward's (an argument here so that the backward sees it)."""
    q, k, v = _kernel_layout(q, k, v)
    launches, o, lse = _forward_launches(q, k, v, causal, sm_scale, kv_start, *_target(q.device), kv_lens)
    run(launches)
    return o, lse


# ----------------------------------------------------------------------------- public


def flash_attention(q, k, v, causal=True, sm_scale=None, kv_start=None, kv_lens=None, deterministic=True):
    """softmax(q kᵀ · sm_scale + mask) v with q: [B, H, Sq, D], k, v: [B, Hkv, Sk, D], Sk >= Sq.

    Grouped-query attention when Hkv < H (Hkv must divide H): query head h attends with K/V head
    h // (H / Hkv). K/V are read in place, never repeated in memory; their gradients come back with
    k's and v's shape [B, Hkv, Sk, D], summed over each group's query heads. causal: bottom-right aligned (query i sees keys j <= i + Sk - Sq). sm_scale defaults to
    1/sqrt(D). kv_start: optional LongTensor[B], the first real position of each left-padded row
    (see engine/reference.py: attention_mask). kv_lens: optional LongTensor[B] for k, v that are a
    whole preallocated KV cache: row b holds kv_lens[b] keys (Sq <= kv_lens[b] <= Sk, not checked: it
    stays on the device) and its queries are the last Sq of them. The shapes then stay the same at
    every decode step (torch.compile, CUDA graphs); inference only (no backward).
    D in HEAD_DIMS; fp16, bf16 or fp32; any strides.
    Differentiable in q, k, v. deterministic=True (default): bitwise-equal gradients run after
    run (dQ in its own pass); False: dQ accumulated with fp32 atomics in the dK/dV pass, which
    saves two of the backward's seven matmuls.
    """
    _check_inputs(q, k, v, kv_start, kv_lens)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _attention(q, k, v, bool(causal), sm_scale, kv_start, kv_lens, bool(deterministic))[0]
