"""Rotary position embedding (RoPE) of q and k in one Triton launch: forward and backward.

    apply_rope(q, k, cos, sin, positions) -> (q', k')
    q: [B, H, T, D], k: [B, Hkv, T, D] (Hkv may be below H: grouped-query attention)
    cos, sin: [P, D/2] tables (engine.reference.rope_tables); positions: LongTensor [B or 1, T]

Dimension i is paired with i + D/2 (Hugging Face's "rotate half" layout) and each pair (a, b)
at position p becomes (a·cos[p, i] − b·sin[p, i], b·cos[p, i] + a·sin[p, i]). Each token has its
own position, read from `positions`, so left padding and KV-cache offsets rotate exactly as in
the model (a row of positions per sequence, or one row shared by the batch). The math is fp32
whatever the input dtype, rounded once to q's dtype (the torch backend rounds cos and sin to
that dtype first, then each product: ours is at least as close to the float64 reference).

One launch rotates both tensors. Counting q's H heads then k's Hkv, program (x, y) takes BLOCK_T
tokens (grid axis y) of a group of G consecutive heads of one sequence (grid axis x: B · ⌈(H + Hkv)
/ G⌉), reading the tokens' cos and sin once for the group; G is 1 where the grid would otherwise
be small (decode), up to 8 on long inputs.
q and k may be strided views (the model passes slices of its fused qkv projection, transposed);
only the head dimension must have unit stride (else it is copied). The outputs are new
contiguous tensors, so autograd sees an ordinary out-of-place op.

Backward: the rotation is orthogonal, so its gradient is the rotation by the opposite angle:
the same kernel with sin negated (a runtime sign, no second build). The backward is itself
differentiable (it calls the same op), so double backward works. cos, sin and positions get no
gradient. Positions must lie in [0, P): they are not checked (that would read device memory).

The launches (kernel, grid, arguments, constexprs, warps, stages) are computed by _launches,
which reads no data: `aot_configs()` runs it on meta tensors, so kernels/compile.py builds
exactly the kernels that run. Grid axis x holds the B·⌈(H + Hkv) / G⌉ head groups (up to
2^31 − 1), axis y the token blocks (up to 65,535); offsets are 64-bit.
"""
import itertools

import torch
import triton
import triton.language as tl

from kernels.launch import Launch, checked_grid, kernel_op

MAX_D = 512  # largest head dimension (the launch table's widest block holds 256 pairs)


# Token and head counts are not specialised: T == 1 (decode) or H == 1 would only add builds.
@triton.jit(do_not_specialize=["T", "H", "HEADS", "GROUP"])
def _rope_kernel(
    Q, K, QO, KO, Cos, Sin, Pos,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_qob, stride_qoh, stride_qot, stride_kob, stride_koh, stride_kot,
    stride_pb, stride_cos, stride_sin,
    T, H, HEADS, GROUP, HALF, sign,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """BLOCK_T tokens of GROUP consecutive heads of one sequence, counting q's H heads then k's:
    x' = x·cos + rotate_half(x)·sign·sin, with cos and sin read once for the group."""
    pid = tl.program_id(0)
    groups = tl.cdiv(HEADS, GROUP)
    b = (pid // groups).to(tl.int64)  # b * stride can pass 2**31 on large batches
    first = (pid % groups) * GROUP
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    i = tl.arange(0, BLOCK_H)
    mask = t_ok[:, None] & (i < HALF)[None, :]
    pos = tl.load(Pos + b * stride_pb + t, mask=t_ok, other=0)
    c = tl.load(Cos + pos[:, None] * stride_cos + i[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(Sin + pos[:, None] * stride_sin + i[None, :], mask=mask, other=0.0).to(tl.float32) * sign
    t = t.to(tl.int64)
    for j in range(GROUP):
        head = (first + j).to(tl.int64)
        if head < H:  # scalars only in the branches: the row pointers are built once, below
            x = Q + b * stride_qb + head * stride_qh
            o = QO + b * stride_qob + head * stride_qoh
            st_x = stride_qt.to(tl.int64)
            st_o = stride_qot.to(tl.int64)
        else:
            x = K + b * stride_kb + (head - H) * stride_kh
            o = KO + b * stride_kob + (head - H) * stride_koh
            st_x = stride_kt.to(tl.int64)
            st_o = stride_kot.to(tl.int64)
        x += t * st_x
        o += t * st_o
        live = tl.where(head < HEADS, T, 0)  # tokens to rotate: none past the last head
        m = (t < live)[:, None] & (i < HALF)[None, :]
        x1 = x[:, None] + i[None, :]  # the first half of each row; its partners sit HALF further on
        o1 = o[:, None] + i[None, :]
        a = tl.load(x1, mask=m, other=0.0).to(tl.float32)
        bb = tl.load(x1 + HALF, mask=m, other=0.0).to(tl.float32)
        tl.store(o1, (a * c - bb * s).to(QO.dtype.element_ty), mask=m)
        tl.store(o1 + HALF, (bb * c + a * s).to(QO.dtype.element_ty), mask=m)


# Launch table: BLOCK_H (pairs per row, a power of two, at least 8) -> (BLOCK_T, warps). A program
# holds 1024 pairs: 8 per thread per tensor (x's two halves, cos, sin, two outputs, and 64-bit
# addresses for the loads and stores). Twice that spilled at D = 16 on sm_80 and sm_90 (measured
# with one head per program; python -m kernels.compile --module kernels.rope).
_CONFIGS = {8: (128, 4), 16: (64, 4), 32: (32, 4), 64: (16, 4), 128: (8, 4), 256: (4, 4)}
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_NUM_STAGES = 3  # Triton's default
# Heads per program: up to _MAX_GROUP, sharing one read of the cos/sin tile, as long as the grid
# keeps _MIN_PROGRAMS programs (a few waves on a 132-SM GPU); decode (T = 1) keeps one head per
# program, so its few heads still run side by side. A runtime argument: no extra builds.
_MAX_GROUP, _MIN_PROGRAMS = 8, 2048


def _pick(d):
    """(BLOCK_T, BLOCK_H, warps) for head dimension d."""
    block_h = max(8, triton.next_power_of_2(d // 2))
    block_t, warps = _CONFIGS[block_h]
    return block_t, block_h, warps


def _group(b, heads, t_blocks):
    """Heads per program: the largest power of two up to _MAX_GROUP that leaves _MIN_PROGRAMS."""
    group = _MAX_GROUP
    while group > 1 and b * triton.cdiv(heads, group) * t_blocks < _MIN_PROGRAMS:
        group //= 2
    return group


def _strides(t):
    """The strides of all but t's last dim, 0 where the dim has size 1 (any stride is valid there;
    a stride of 1 would become a separate Triton specialisation)."""
    return tuple(t.stride(d) if t.shape[d] > 1 else 0 for d in range(t.dim() - 1))


def _unit_last(t):
    """t with unit stride along the last dim, and no other stride of 1 (only overlapping views have
    one: the kernel widens these strides with .to(), which a constant 1 lacks); copied if need be."""
    return t if t.stride(-1) == 1 and 1 not in _strides(t) else t.contiguous()


def _check(q, k, cos, sin, positions):
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, heads, T, D], got shape {tuple(t.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must both be float32, float16 or bfloat16, got {q.dtype} and {k.dtype}")
    (b, _, t, d), (bk, _, tk, dk) = q.shape, k.shape
    if (bk, tk, dk) != (b, t, d) or k.device != q.device:
        raise ValueError(f"k must be [B, Hkv, T, D] like q {tuple(q.shape)} on {q.device}, got {tuple(k.shape)} on {k.device}")
    if d % 2 or not 2 <= d <= MAX_D:
        raise ValueError(f"the head dimension D must be even and between 2 and {MAX_D}, got shape {tuple(q.shape)}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != d // 2 or table.shape[0] < 1 or table.device != q.device:
            raise ValueError(f"{name} must be a [P, D/2 = {d // 2}] table on {q.device}, got {tuple(table.shape)} on {table.device}")
        if not table.is_floating_point():
            raise ValueError(f"{name} must be a floating-point table, got {table.dtype}")
    if (positions.dtype not in (torch.int64, torch.int32) or positions.dim() != 2 or positions.shape[0] not in (1, b)
            or positions.shape[1] != t or positions.device != q.device):
        raise ValueError(f"positions must be an integer tensor [B or 1, T] = [{b} or 1, {t}] on {q.device}, "
                         f"got {positions.dtype} {tuple(positions.shape)} on {positions.device}")


def _launches(q, k, cos, sin, positions, sign=1.0):
    """The launch rotating q and k by sign·angle, and the outputs it will write. Reads no data:
    kernels/compile.py runs it on meta tensors, the custom op on fake ones."""
    _check(q, k, cos, sin, positions)
    q, k, cos, sin = (_unit_last(t) for t in (q, k, cos, sin))
    positions = positions.contiguous()
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    (b, h, t, d), hkv = q.shape, k.shape[1]
    if not b * t:
        return [], qo, ko
    block_t, block_h, warps = _pick(d)
    t_blocks = triton.cdiv(t, block_t)
    group = _group(b, h + hkv, t_blocks)
    launch = Launch(
        _rope_kernel, checked_grid(b * triton.cdiv(h + hkv, group), t_blocks),
        (q, k, qo, ko, cos, sin, positions, *_strides(q), *_strides(k), *_strides(qo), *_strides(ko),
         positions.stride(0) if positions.shape[0] > 1 else 0, cos.stride(0), sin.stride(0),
         t, h, h + hkv, group, d // 2, float(sign)),
        dict(BLOCK_T=block_t, BLOCK_H=block_h), warps, _NUM_STAGES)
    return [launch], qo, ko


# Head dimensions on which the launcher picks every build (kernels/compile.py): each table entry's
# widest D (D/2 = BLOCK_H) and a D two below it (D/2 odd: Triton specialises D/2 and the strides on
# divisibility by 16).
_AOT_HEAD_DIMS = sorted({d for block_h in _CONFIGS for d in (2 * block_h, 2 * block_h - 2)})
_AOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Batch, head and token strides, multiplied by int64 indices (kernels/compile.py checks the PTX).
_WIDE = ("stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_kt",
         "stride_qob", "stride_qoh", "stride_qot", "stride_kob", "stride_koh", "stride_kot")


def aot_configs() -> list[dict]:
    """Every build the launcher picks, for kernels/compile.py, per arch, dtype and table entry, with
    D/2 % 16 == 0 and not (labelled by D). Each holds the launcher's own Launch on meta tensors laid out as the model
    passes them: q and k slices of one [B, T, H + 2·Hkv, D] projection, transposed to [B, heads, T, D];
    positions [B, T] (left padding)."""
    configs = []
    for arch, dtype, d in itertools.product((80, 90), _AOT_DTYPES, _AOT_HEAD_DIMS):
        b, t, h, hkv = 4, 512, 32, 8
        qkv = torch.empty(b, t, h + 2 * hkv, d, dtype=dtype, device="meta")
        q, k, _ = qkv.split([h, hkv, hkv], dim=2)
        cos, sin = (torch.empty(4096, d // 2, dtype=torch.float32, device="meta") for _ in range(2))
        positions = torch.empty(b, t, dtype=torch.int64, device="meta")
        (launch,), _, _ = _launches(q.transpose(1, 2), k.transpose(1, 2), cos, sin, positions)
        configs.append({
            "kernel": "rope", "arch": arch, "launch": launch, "wgmma": False, "wide": _WIDE,
            "config": f"{_DTYPES[dtype]} D={d} BLOCK_T={launch.constexprs['BLOCK_T']} BLOCK_H={launch.constexprs['BLOCK_H']} "
                      f"w{launch.num_warps} s{launch.num_stages}",
        })
    return configs


# ----------------------------------------------------------------------------- registration
# torch.library.custom_op (kernels/launch.py: kernel_op says why not triton_op).


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, positions, sign = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.sign = sign


def _backward(ctx, dq, dk):
    cos, sin, positions = ctx.saved_tensors
    # The rotation's transpose is the rotation by the opposite angle (differentiable in turn).
    dq, dk = _rope(dq, dk, cos, sin, positions, -ctx.sign)
    return dq, dk, None, None, None, None


@kernel_op("apply_rope", "(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor positions, float sign) -> (Tensor, Tensor)",
           _backward, _setup_context)
def _rope(q, k, cos, sin, positions, sign, run):
    """(q, k) rotated by sign · angle(position)."""
    launches, qo, ko = _launches(q, k, cos, sin, positions, sign)
    run(launches)
    return qo, ko


# ----------------------------------------------------------------------------- public


def apply_rope(q, k, cos, sin, positions):
    """Rotate q [B, H, T, D] and k [B, Hkv, T, D] to their positions: (q', k') as new tensors.

    cos, sin: [P, D/2] tables of angle position · frequency_i; positions: integer tensor [B or 1, T]
    (a row per sequence, or one row for the whole batch), each in [0, P). Differentiable in q and k.
    """
    return _rope(q, k, cos, sin, positions, 1.0)
