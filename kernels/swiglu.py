"""Fused SwiGLU activation in Triton: forward and backward.

    swiglu(gate, up) = silu(gate) · up,   silu(g) = g · sigmoid(g)

The Llama MLP's activation, between its gate/up projection and its down projection. Any leading
shape; gate and up alike. The math is fp32 whatever the input dtype, rounded once to the output
dtype (PyTorch's two ops round silu(gate) first, then the product). gate and up may be strided
views — the model passes the two halves of one [.., 2I] projection — as long as the last dim has
unit stride and the leading dims flatten to rows (else they are copied).

Backward, one pass, recomputing sigmoid(g) rather than saving it:
    dgate = dy · up · sigmoid(g) · (1 + g · (1 − sigmoid(g))),   dup = dy · silu(g)

Whether this ships as TritonBackend.swiglu awaits a GPU run: the issue asks for it only where it
beats PyTorch's two ops (F.silu(gate) * up), and speed cannot be measured on the CPU. It is wired
in, and benchmarks/swiglu.py sets it against F.silu(gate) * up and torch.compile of the same, so
the GPU suite decides.

The launches are computed by _forward_launches / _backward_launches, which read no data:
`aot_configs()` runs them on meta tensors, so kernels/compile.py builds exactly the kernels that
run. Grid axis x holds the row blocks (up to 2^31 − 1), axis y the column blocks (up to 65,535);
row offsets are 64-bit.
"""
import itertools

import torch
import triton
import triton.language as tl

from kernels.launch import Launch, checked_grid, kernel_op


@triton.jit(do_not_specialize=["M"])
def _swiglu_fwd_kernel(G, U, Y, stride_gm, stride_um, stride_ym, M, N,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)[:, None]  # row * stride can pass 2**31 on large batches
    g = tl.load(G + rows * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_um + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _swiglu_bwd_kernel(G, U, DY, DG, DU, stride_gm, stride_um, stride_dym, stride_dgm, stride_dum, M, N,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)[:, None]
    g = tl.load(G + rows * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_um + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + rows * stride_dgm + cols[None, :], dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * stride_dum + cols[None, :], (dy * silu).to(DU.dtype.element_ty), mask=mask)


# Launch table: (BLOCK_N, rows per program, warps). A row of N takes the first entry with
# BLOCK_N >= N, else the last, with the row split into column blocks (grid axis y). Each program
# holds 2048 elements per tensor (16 per thread with 4 warps); short rows are packed several to
# a tile. Forward and backward share it.
_CONFIGS = ((64, 32, 4), (256, 8, 4), (2048, 1, 4))
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_NUM_STAGES = 3  # Triton's default


def _pick(n):
    return next((cfg for cfg in _CONFIGS if cfg[0] >= n), _CONFIGS[-1])


def _as_rows(t, n):
    """A [M, N] view of t with unit stride along N (copied only when it has to be)."""
    t = t.reshape(-1, n)
    return t if t.stride(1) == 1 or t.shape[0] * n == 0 else t.contiguous()


def _row_stride(t):
    return t.stride(0) if t.shape[0] > 1 else 0  # a stride of 1 (one row) would be its own build


def _check(gate, up):
    if gate.dtype not in _DTYPES or up.dtype != gate.dtype:
        raise ValueError(f"gate and up must both be float32, float16 or bfloat16, got {gate.dtype} and {up.dtype}")
    if gate.shape != up.shape or gate.device != up.device:
        raise ValueError(f"up must have gate's shape {tuple(gate.shape)} on {gate.device}, got {tuple(up.shape)} on {up.device}")
    if gate.dim() == 0:
        raise ValueError("gate and up must have at least one dimension, got scalars")


def _grid(m, n):
    block_n, rows, warps = _pick(n)
    return checked_grid(triton.cdiv(m, rows), triton.cdiv(n, block_n)), dict(ROWS=rows, BLOCK_N=block_n), warps


def _forward_launches(gate, up):
    """The forward's launch and y (gate's shape) that it will write. Reads no data:
    kernels/compile.py runs it on meta tensors, the custom op on fake ones."""
    _check(gate, up)
    n = gate.shape[-1]
    g2, u2 = _as_rows(gate, n), _as_rows(up, n)
    m = g2.shape[0]
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if not m * n:
        return [], y
    grid, constexprs, warps = _grid(m, n)
    y2 = y.view(m, n)
    return [Launch(_swiglu_fwd_kernel, grid, (g2, u2, y2, _row_stride(g2), _row_stride(u2), _row_stride(y2), m, n),
                   constexprs, warps, _NUM_STAGES)], y


def _backward_launches(dy, gate, up):
    """The backward's launch and dgate, dup (gate's shape) that it will write. Reads no data."""
    n = gate.shape[-1]
    g2, u2, dy2 = _as_rows(gate, n), _as_rows(up, n), _as_rows(dy.to(gate.dtype), n)
    m = g2.shape[0]
    dg, du = (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) for _ in range(2))
    if not m * n:
        return [], dg, du
    grid, constexprs, warps = _grid(m, n)
    dg2, du2 = dg.view(m, n), du.view(m, n)
    args = (g2, u2, dy2, dg2, du2, *(_row_stride(t) for t in (g2, u2, dy2, dg2, du2)), m, n)
    return [Launch(_swiglu_bwd_kernel, grid, args, constexprs, warps, _NUM_STAGES)], dg, du


# Sizes on which the launchers pick every build (kernels/compile.py): each table entry's widest N
# and one less (Triton specialises N and the row strides on divisibility by 16). Wider rows, split
# into column blocks, run the last entry's build.
_AOT_SIZES = sorted({n for block_n, *_ in _CONFIGS for n in (block_n, block_n - 1)})
_AOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_WIDE = {_swiglu_fwd_kernel: ("stride_gm", "stride_um", "stride_ym"),
         _swiglu_bwd_kernel: ("stride_gm", "stride_um", "stride_dym", "stride_dgm", "stride_dum")}
_NAMES = {_swiglu_fwd_kernel: "swiglu_fwd", _swiglu_bwd_kernel: "swiglu_bwd"}


def aot_configs() -> list[dict]:
    """Every build the launchers pick, for kernels/compile.py, per arch, dtype and table entry, with
    N % 16 == 0 and not. Each holds the launcher's own Launch on meta tensors laid out as the model
    passes them: gate and up the two halves of one [4096, 2N] projection."""
    configs = []
    for arch, dtype, n in itertools.product((80, 90), _AOT_DTYPES, _AOT_SIZES):
        gate, up = torch.empty(4096, 2 * n, dtype=dtype, device="meta").chunk(2, dim=-1)
        launches, _ = _forward_launches(gate, up)
        launches += _backward_launches(torch.empty(4096, n, dtype=dtype, device="meta"), gate, up)[0]
        for launch in launches:
            configs.append({
                "kernel": _NAMES[launch.kernel], "arch": arch, "launch": launch, "wgmma": False,
                "wide": _WIDE[launch.kernel],
                "config": f"{_DTYPES[dtype]} N%16{'=0' if n % 16 == 0 else '>0'} "
                          f"ROWS={launch.constexprs['ROWS']} BLOCK_N={launch.constexprs['BLOCK_N']} "
                          f"w{launch.num_warps} s{launch.num_stages}",
            })
    return configs


# ----------------------------------------------------------------------------- registration
# torch.library.custom_op (kernels/launch.py: kernel_op says why not triton_op).


@kernel_op("swiglu_backward", "(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)")
def _swiglu_backward(dy, gate, up, run):
    launches, dg, du = _backward_launches(dy, gate, up)
    run(launches)
    return dg, du


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    return _swiglu_backward(dy, *ctx.saved_tensors)


@kernel_op("swiglu", "(Tensor gate, Tensor up) -> Tensor", _backward, _setup_context)
def _swiglu(gate, up, run):
    launches, y = _forward_launches(gate, up)
    run(launches)
    return y


# ----------------------------------------------------------------------------- public


def swiglu(gate, up):
    """silu(gate) · up, fused (one read of each input, one write); differentiable in both."""
    return _swiglu(gate, up)
