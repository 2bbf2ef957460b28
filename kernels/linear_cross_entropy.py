"""Fused linear + cross-entropy: the training loss without the [tokens, vocab] logits.

    loss = Σ_i w_i · (logsumexp_v(h_i · W_v) − h_i · W_{t_i}),
    w_i = counted_i / Σ_j counted_j  (reduction "mean"; 1 · counted_i for "sum"),
    counted_i = (t_i != ignore_index) · loss_mask_i

the same number as engine.model.GPT.loss(h @ W.T, targets, loss_mask): the mean over counted tokens,
0 (with zero gradients) when nothing counts. h: [..., C]; W: [V, C] (a bias-free head: tied
embeddings); targets: [...] like h's leading dims; loss_mask: the same shape, any weights.

How (Liger Kernel's scheme, gradients computed in the forward). The rows are taken a chunk at a
time; for each chunk of n rows:
    z = h_c @ Wᵀ                  [n, V] in h's dtype (cuBLAS), the only logits that ever exist
    _ce_rows_kernel(z)            one row per program, over the vocabulary in BLOCK_V tiles: an
                                  online max / sum-exp in fp32 gives lse_i; loss_i = w_i (lse_i − z_i[t_i]);
                                  then z is overwritten in place by dz = w_i (softmax(z_i) − onehot(t_i))
    dh_c = dz @ W,  dW += dzᵀ @ h_c   (cuBLAS, only for the inputs that need a gradient)
and the backward only scales dh, dW by the loss's incoming gradient. A chunk holds about sixteen
times as many elements as h (at least 64 rows): the extra memory is a fixed multiple of h's size
(plus an fp32 dW), whatever V.

Why this and not recomputing the logits in the backward (as engine.backends' torch version does):
it runs three matmuls, the minimum (eager linear + cross-entropy runs three too), where
recomputation runs four, and this is a training loss whose backward always follows. The price:
dh and dW are held from the forward until the backward (the size of h and W, which the backward
would allocate anyway). dW is summed over the chunks in fp32: summing in the weights' dtype, as
Liger does, gave 3.2x eager's dW error on the CPU in bf16 over 16 chunks (N=4096, V=8192, C=128),
where fp32 rounds once, like eager's one matmul. For 16-bit weights that costs one extra [V, C]
pass per chunk (dzᵀ @ h_c added into the fp32 sum), hence the large chunks. The matmuls are
cuBLAS's, not Triton's: no build here contains a tl.dot (so no wgmma to check).
Under no_grad the gradient matmuls are skipped; the kernel still writes dz (one pass).
Not supported: reduction "none" (its gradient cannot be made in the forward), a logit softcap.

The rows are padded to a multiple of 16 elements in the chunk buffer, so every row starts 16-aligned
and the kernel has one build per dtype; its launch is computed by _launch, which reads no data:
`aot_configs()` runs it on meta tensors for kernels/compile.py.
"""
import torch
import triton
import triton.language as tl

from kernels.launch import Launch, checked_grid, kernel_op


@triton.jit(do_not_specialize=["V"])
def _ce_rows_kernel(Z, T, ROW_W, LOSS, stride_z, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z  # row * stride passes 2**31 at 16k rows of a 128k vocabulary
    t = tl.load(T + row)
    w = tl.load(ROW_W + row)  # fp32: counted / denominator, 0 for rows that do not count
    cols = tl.arange(0, BLOCK_V)
    # pass 1: online log-sum-exp over the vocabulary tiles, in fp32
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        z = tl.load(z_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    counted = w != 0.0
    z_t = tl.load(z_row + t, mask=counted, other=0.0).to(tl.float32)  # t is in range where counted (launcher)
    tl.store(LOSS + row, tl.where(counted, w * (lse - z_t), 0.0))
    # pass 2: the logits' gradient, in place
    for start in range(0, V, BLOCK_V):
        c = start + cols
        z = tl.load(z_row + c, mask=c < V, other=0.0).to(tl.float32)
        dz = w * (tl.exp(z - lse) - (c == t).to(tl.float32))
        tl.store(z_row + c, dz.to(Z.dtype.element_ty), mask=c < V)


_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BLOCK_V, NUM_WARPS, NUM_STAGES = 4096, 8, 3  # 16 fp32 values per thread per tile
_ALIGN = 16  # elements: the chunk buffer's row stride is a multiple of it
_MIN_ROWS = 64


def _chunk_rows(n, c, v):
    """Rows per chunk: the [rows, V] logits chunk holds about 16 · N · C elements (sixteen times h;
    at 16k tokens, C = 2048, V = 128k: 4 chunks of 4096 rows, 1 GB in bf16), at least 64 rows (so
    small inputs run in one or a few chunks) and at most N. Fewer chunks, fewer passes over dW."""
    return max(1, min(n, max(_MIN_ROWS, triton.next_power_of_2(triton.cdiv(16 * n * c, v)))))


def _launch(z, targets, row_w, loss):
    """The kernel's launch on the logits chunk z [n, V] (row stride a multiple of 16), in place."""
    return Launch(_ce_rows_kernel, checked_grid(z.shape[0]), (z, targets, row_w, loss, z.stride(0), z.shape[1]),
                  dict(BLOCK_V=BLOCK_V), NUM_WARPS, NUM_STAGES)


def _chunk_buffer(rows, v, dtype, device):
    """[rows, V] with rows 16-aligned: a view of [rows, round_up(V, 16)]. Zeroed, padding included:
    PyTorch's CPU bf16 matmul (torch 2.13) reads a strided operand's row padding, and whatever
    lies there (NaN, in the tests' poisoned memory) reaches the product."""
    return torch.zeros(rows, triton.cdiv(v, _ALIGN) * _ALIGN, dtype=dtype, device=device)[:, :v]


def aot_configs() -> list[dict]:
    """The kernel's one build per dtype and arch (kernels/compile.py): a chunk of a GPT-2-sized
    vocabulary, laid out as the launcher allocates it."""
    configs = []
    for arch in (80, 90):
        for dtype, name in _DTYPES.items():
            z = _chunk_buffer(4096, 50257, dtype, "meta")
            t = torch.empty(4096, dtype=torch.long, device="meta")
            w, loss = (torch.empty(4096, device="meta") for _ in range(2))
            launch = _launch(z, t, w, loss)
            configs.append({"kernel": "lce_rows", "arch": arch, "launch": launch, "wgmma": False, "wide": ("stride_z",),
                            "config": f"{name} BLOCK_V={BLOCK_V} w{NUM_WARPS} s{NUM_STAGES}"})
    return configs


def _row_weights(targets, loss_mask, ignore_index, reduction, v):
    """w [N] fp32: what each row's loss counts for (0: not at all). Raises on a counted target
    outside 0..V-1 (one device sync; not under torch.compile, where it would break the graph)."""
    counted = (targets != ignore_index).float()
    if loss_mask is not None:
        counted = counted * loss_mask.float()
    bad = (counted != 0) & ((targets < 0) | (targets >= v))
    if not torch.compiler.is_compiling() and bad.any():
        raise ValueError(f"targets must be in 0..{v - 1} (vocabulary size {v}) or ignore_index={ignore_index}, "
                         f"got {targets[bad][0].item()}")
    return counted / counted.sum().clamp(min=1.0) if reduction == "mean" else counted


def _forward(h, weight, targets, row_w, need_dh, need_dw, run):
    """(loss, dh or None, dW or None) for a loss gradient of 1; h [N, C], targets, row_w [N]. run
    takes the kernel's launches (kernel_op's: launched, or not when tracing on fake tensors)."""
    n, v = h.shape[0], weight.shape[0]
    loss_rows = torch.zeros(n, dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if need_dh else None
    # dW sums over every chunk: in fp32, a 16-bit chunk's share landing in `part` first
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_dw else None
    part = torch.empty_like(weight) if need_dw and weight.dtype != torch.float32 else None
    rows = _chunk_rows(n, h.shape[1], v)
    buf = _chunk_buffer(rows, v, h.dtype, h.device) if n else None
    for start in range(0, n, rows):
        end = min(n, start + rows)
        h_c, z = h[start:end], buf[: end - start]
        torch.mm(h_c, weight.T, out=z)
        run([_launch(z, targets[start:end], row_w[start:end], loss_rows[start:end])])
        if need_dh:
            torch.mm(z, weight, out=dh[start:end])
        if need_dw and part is None:
            dw.addmm_(z.T, h_c)
        elif need_dw:
            dw += torch.mm(z.T, h_c, out=part)
    return loss_rows.sum(), dh, None if dw is None else dw.to(weight.dtype)


def _check(h, weight, targets, loss_mask, reduction):
    if h.dtype not in _DTYPES or weight.dtype != h.dtype:
        raise ValueError(f"h and weight must both be float32, float16 or bfloat16, got {h.dtype} and {weight.dtype}")
    if h.dim() < 1 or weight.dim() != 2 or weight.shape[1] != h.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight must be [V >= 1, C] with C = h's last dim {h.shape[-1] if h.dim() else None}, "
                         f"got {tuple(weight.shape)}")
    if targets.shape != h.shape[:-1] or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be integer ids of shape {tuple(h.shape[:-1])} (h's leading dims), "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    if loss_mask is not None and loss_mask.shape != targets.shape:
        raise ValueError(f"loss_mask must have targets' shape {tuple(targets.shape)}, got {tuple(loss_mask.shape)}")
    if any(t.device != h.device for t in (weight, targets) + ((loss_mask,) if loss_mask is not None else ())):
        raise ValueError(f"weight, targets and loss_mask must be on h's device {h.device}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


# ----------------------------------------------------------------------------- registration
# torch.library.custom_op, like every kernel here (kernels/launch.py's kernel_op says why). The op
# returns the loss with its gradients for a loss gradient of 1, made in the forward; the backward
# scales them.


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad, _grad_dh, _grad_dw):
    dh, dw = ctx.saved_tensors
    return (None if dh is None else dh * grad.to(dh.dtype), None if dw is None else dw * grad.to(dw.dtype),
            None, None, None, None)


@kernel_op("linear_cross_entropy", "(Tensor h, Tensor weight, Tensor targets, Tensor row_w, bool need_dh, "
           "bool need_dw) -> (Tensor, Tensor?, Tensor?)", _backward, _setup_context)
def _linear_cross_entropy(h, weight, targets, row_w, need_dh, need_dw, run):
    return _forward(h, weight, targets, row_w, need_dh, need_dw, run)


# ----------------------------------------------------------------------------- public


def linear_cross_entropy(h, weight, targets, loss_mask=None, ignore_index=-1, reduction="mean"):
    """Cross-entropy of the logits h @ weight.T against targets, never holding the logits whole.

    h: [..., C]; weight: [V, C]; targets: [...] (h's leading dims); loss_mask: [...] or None.
    reduction "mean": over the counted tokens (0 when none count); "sum": their sum. A float32 scalar,
    differentiable in h and weight. Under autocast, h and weight are cast to its dtype first (as
    F.linear is)."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        h, weight = h.to(dtype), weight.to(dtype)
    _check(h, weight, targets, loss_mask, reduction)
    t = targets.reshape(-1)
    row_w = _row_weights(t, None if loss_mask is None else loss_mask.reshape(-1), ignore_index, reduction, weight.shape[0])
    grads = torch.is_grad_enabled()
    with torch.autocast(device, enabled=False):
        loss, _, _ = _linear_cross_entropy(h.reshape(-1, h.shape[-1]).contiguous(), weight.contiguous(), t.contiguous(),
                                           row_w, grads and h.requires_grad, grads and weight.requires_grad)
    return loss
