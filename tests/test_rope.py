"""kernels.apply_rope against the float64 reference, forward and backward.

On the CPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
before triton is imported). fp32 must agree with float64 to a relative 1e-5; fp16 may be off by at
most twice what the torch backend's own fp16 computation is off, or one fp16 ulp of the largest
value (+1e-5). Outputs are allocated on
NaN-poisoned memory, so an element the kernel forgets to write fails the test.
"""
import itertools

import pytest
import torch
import triton

import kernels
from benchmarks import rope as rope_bench
from engine import reference
from engine.backends import TorchBackend
from kernels import rope
from kernels.launch import MAX_GRID

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P = 1024  # rows of the tables


pytestmark = pytest.mark.usefixtures("nan_poisoned_outputs")  # conftest.py: outputs start as NaN


def make_inputs(b, h, hkv, t, d, positions="offset", seed=0):
    """q, k as the model makes them (slices of one [B, T, H + 2·Hkv, D] projection, transposed), the
    gradients dq, dk, the tables and positions: "offset" (a KV cache 5 tokens in, one row for the
    batch), "padded" (the same with per-row left padding), "zero" (from 0, [1, T])."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, t, h + 2 * hkv, d, generator=g, dtype=torch.float64)
    q, k, _ = qkv.split([h, hkv, hkv], dim=2)
    cos, sin = reference.rope_tables(d, P, theta=10000.0)
    start = 0 if positions == "zero" else 5
    pos = torch.arange(start, start + t)[None]  # [1, T]
    if positions == "padded":
        pos = (pos - torch.arange(b)[:, None] * 3).clamp(min=0)  # [B, T]: row i has 3·i pad tokens
    return {"qkv": qkv, "heads": (h, hkv), "q": q.transpose(1, 2), "k": k.transpose(1, 2),
            "cos": cos, "sin": sin, "positions": pos,
            "dq": torch.randn(b, h, t, d, generator=g, dtype=torch.float64),
            "dk": torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64)}


def run(fn, inp, dtype):
    """Outputs and input gradients of fn (kernel or reference) on inp's q, k cast to dtype, as float64.
    q and k are strided views of the qkv projection, as in the model."""
    h, hkv = inp["heads"]
    qkv = inp["qkv"].to(DEVICE, dtype, copy=True).requires_grad_()
    q, k, _ = (x.transpose(1, 2) for x in qkv.split([h, hkv, hkv], dim=2))
    tables = torch.float64 if dtype == torch.float64 else torch.float32
    qo, ko = fn(q, k, inp["cos"].to(DEVICE, tables), inp["sin"].to(DEVICE, tables), inp["positions"].to(DEVICE))
    ((qo * inp["dq"].to(DEVICE, dtype)).sum() + (ko * inp["dk"].to(DEVICE, dtype)).sum()).backward()
    dq, dk, _ = (x.transpose(1, 2) for x in qkv.grad.split([h, hkv, hkv], dim=2))
    outs = {"q": qo, "k": ko, "dq": dq, "dk": dk}
    for name, t in outs.items():
        assert t.dtype == dtype, name
    return {n: t.detach().double().cpu() for n, t in outs.items()}


def max_err(got, want):
    return (got - want).abs().max().item()


def check(got, want, torch_lowp=None, dtype=torch.float16):
    """fp32: relative max error < 1e-5. fp16/bf16 (torch_lowp given, dtype theirs): at most 2x torch's
    error or 1 ulp of the largest value, + 1e-5.
    Returns the largest relative error."""
    worst = 0.0
    for name in want:
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite values (an unwritten output?)"
        err = max_err(got[name], want[name])
        scale = max(want[name].abs().max().item(), 1e-3)
        worst = max(worst, err / scale)
        if torch_lowp is None:
            assert err / scale < 1e-5, f"{name}: relative error {err / scale:.2e}"
        else:
            # on a handful of elements torch may round luckily: one ulp of the largest value is allowed
            bound = max(2 * max_err(torch_lowp[name], want[name]), torch.finfo(dtype).eps * scale) + 1e-5
            assert err <= bound, f"{name}: error {err:.2e} > max(2 x torch's error, 1 ulp) (+1e-5) = {bound:.2e}"
    return worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("t", [1, 7, 129])
@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("h,hkv", [(1, 1), (2, 1), (4, 4), (8, 2)])
def test_matches_float64_reference(h, hkv, d, t, dtype):
    positions = ("offset", "padded", "zero")[(h + d + t) % 3]  # every kind meets every size along some axis
    inp = make_inputs(2, h, hkv, t, d, positions, seed=h * 1000 + d * 10 + t)
    want = run(reference.apply_rope, inp, torch.float64)
    got = run(kernels.apply_rope, inp, dtype)
    check(got, want, run(TorchBackend().apply_rope, inp, dtype) if dtype == torch.float16 else None)


@pytest.mark.parametrize("h,hkv", [(8, 2), (4, 1), (3, 3)])
def test_several_heads_per_program(monkeypatch, h, hkv):
    """Long inputs give each program a group of up to 8 heads (q's then k's, the last group partial
    when 8 does not divide H + Hkv); the tiny test inputs get there with the threshold lowered."""
    monkeypatch.setattr(rope, "_MIN_PROGRAMS", 1)
    inp = make_inputs(2, h, hkv, 7, 64, "padded", seed=h)
    t_blocks = triton.cdiv(7, rope._pick(64)[0])
    assert rope._group(2, h + hkv, t_blocks) == 8
    want = run(reference.apply_rope, inp, torch.float64)
    check(run(kernels.apply_rope, inp, torch.float32), want)
    check(run(kernels.apply_rope, inp, torch.float16), want, run(TorchBackend().apply_rope, inp, torch.float16))


@pytest.mark.parametrize("positions", ["offset", "padded", "zero"])
def test_positions_broadcast_and_per_row(positions):
    """[1, T] positions (shared by the batch) and [B, T] ones (left padding), 3 rows, odd D."""
    inp = make_inputs(3, 4, 2, 9, 22, positions, seed=7)
    assert inp["positions"].shape[0] == (3 if positions == "padded" else 1)
    check(run(kernels.apply_rope, inp, torch.float32), run(reference.apply_rope, inp, torch.float64))


def test_matches_the_torch_backend_in_fp32():
    inp = make_inputs(2, 8, 2, 33, 64, "padded", seed=3)
    got, want = run(kernels.apply_rope, inp, torch.float32), run(TorchBackend().apply_rope, inp, torch.float32)
    for name in want:
        assert max_err(got[name], want[name]) < 1e-5 * want[name].abs().max().item(), name


def test_non_contiguous_inputs_give_the_same_result():
    """Strided q and k (every layout the model and autograd hand over) give the contiguous result."""
    inp = make_inputs(2, 4, 2, 7, 32, "padded", seed=1)
    cos, sin, pos = inp["cos"].float(), inp["sin"].float(), inp["positions"]
    q, k = inp["q"].float(), inp["k"].float()
    assert not q.is_contiguous() and not k.is_contiguous()
    want = kernels.apply_rope(q.contiguous(), k.contiguous(), cos, sin, pos)
    layouts = {
        "qkv slices": (q, k),
        "head dim strided": (torch.stack([q, q], -1).flatten(-2)[..., ::2], k),  # copied by the launcher
        "expanded batch": (q[:1].expand(2, -1, -1, -1), k[:1].expand(2, -1, -1, -1)),  # batch stride 0
        "[B, T, H, D] permuted": (q.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3), k),
    }
    for name, (qq, kk) in layouts.items():
        got = kernels.apply_rope(qq, kk, cos, sin, pos)
        ref = want if name != "expanded batch" else kernels.apply_rope(
            qq.contiguous(), kk.contiguous(), cos, sin, pos)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), name
        assert got[0].is_contiguous() and got[1].is_contiguous()
    # strided tables (a slice of a wider one)
    wide_cos, wide_sin = torch.cat([cos, cos], 1), torch.cat([sin, sin], 1)
    got = kernels.apply_rope(q, k, wide_cos[:, :16], wide_sin[:, :16], pos)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_gradient_of_an_unused_output_and_double_backward():
    """Only q' used: dk is zero. The backward is the inverse rotation, so rotating the gradient back
    and forth is the identity, and gradcheck passes to second order in float32."""
    inp = make_inputs(1, 2, 1, 5, 16, "offset", seed=2)
    q, k = (inp[n].float().requires_grad_() for n in ("q", "k"))
    cos, sin, pos = inp["cos"].float(), inp["sin"].float(), inp["positions"]
    qo, _ = kernels.apply_rope(q, k, cos, sin, pos)
    qo.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))
    (dq,) = torch.autograd.grad(kernels.apply_rope(q, k, cos, sin, pos)[0], q, inp["dq"].float(), create_graph=True)
    (ddq,) = torch.autograd.grad((dq * q).sum(), q)  # d/dq of <R^T dy, q> is R^T dy
    assert torch.allclose(ddq, dq.detach(), atol=1e-6)


def test_zero_tokens_and_batch():
    cos, sin = reference.rope_tables(16, 8, 10000.0)
    for b, t in ((0, 3), (2, 0)):
        q = torch.randn(b, 2, t, 16, requires_grad=True)
        k = torch.randn(b, 1, t, 16, requires_grad=True)
        qo, ko = kernels.apply_rope(q, k, cos, sin, torch.zeros(1, t, dtype=torch.long))
        assert qo.shape == q.shape and ko.shape == k.shape
        (qo.sum() + ko.sum()).backward()
        assert q.grad.shape == q.shape


@pytest.mark.parametrize("b,h,t", [(1, 32, 1), (2**16, 64, 8), (2**20, 4096, 1), (1, 8, 2**22), (1, 8, 2**24)])
def test_launch_grids_fit_cuda_limits(b, h, t):
    """Sequences x head groups of q and k sit on grid axis x (up to 2^31 - 1 programs), token blocks
    on axis y (up to 65,535); past either the launcher names the limit. Decode keeps one head per
    program."""
    for d in (16, 64, 128, rope.MAX_D):
        q = torch.empty(b, h, t, d, device="meta")
        k = torch.empty(b, max(1, h // 4), t, d, device="meta")
        cos, sin = (torch.empty(8, d // 2, device="meta") for _ in range(2))
        positions = torch.empty(1, t, dtype=torch.long, device="meta")
        heads, t_blocks = h + k.shape[1], triton.cdiv(t, rope._pick(d)[0])
        group = rope._group(b, heads, t_blocks)
        assert group == 1 or b * triton.cdiv(heads, group) * t_blocks >= rope._MIN_PROGRAMS
        try:
            (launch,), _, _ = rope._launches(q, k, cos, sin, positions)
        except ValueError as err:
            assert "CUDA's limit" in str(err)
            assert b * triton.cdiv(heads, group) > MAX_GRID[0] or t_blocks > MAX_GRID[1]
            continue
        assert launch.grid == (b * triton.cdiv(heads, group), t_blocks)
        assert all(1 <= n <= limit for n, limit in zip(launch.grid, MAX_GRID))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, k, c, s, p: (q.double(), k.double(), c, s, p), "float32, float16 or bfloat16"),
        (lambda q, k, c, s, p: (q, k.half(), c, s, p), "float32, float16 or bfloat16"),
        (lambda q, k, c, s, p: (q[0], k, c, s, p), r"q must be \[B, heads, T, D\]"),
        (lambda q, k, c, s, p: (q, k[:, :, :3], c, s, p), "k must be"),
        (lambda q, k, c, s, p: (q[..., :15], k[..., :15], c, s, p), "must be even"),
        (lambda q, k, c, s, p: (q, k, c[:, :4], s, p), "cos must be"),
        (lambda q, k, c, s, p: (q, k, c, s.long(), p), "sin must be a floating-point"),
        (lambda q, k, c, s, p: (q, k, c, s, p.float()), "positions must be"),
        (lambda q, k, c, s, p: (q, k, c, s, p[:, :2]), "positions must be"),
        (lambda q, k, c, s, p: (q, k, c, s, p.expand(3, -1)), "positions must be"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = reference.rope_tables(16, 8, 10000.0)
    args = call(q, k, cos, sin, torch.arange(5)[None])
    with pytest.raises(ValueError, match=match):
        kernels.apply_rope(*args)


def test_aot_builds_are_every_launch_choice():
    """kernels/compile.py builds the launcher's own launches: every table entry for each dtype, at its
    widest D (D/2 a power of two) and at D - 2 (D/2 odd, not a multiple of 16), per arch; each label
    is one build."""
    configs = rope.aot_configs()
    built = [(c["arch"], c["config"].split()[0], c["launch"].constexprs["BLOCK_H"], c["launch"].constexprs["BLOCK_T"],
              c["launch"].num_warps, 2 * c["launch"].args[-2]) for c in configs]
    assert len(set(built)) == len(built) == len({(c["arch"], c["config"]) for c in configs})
    assert set(built) == {(arch, dtype, block_h, block_t, warps, d)
                          for arch, dtype, (block_h, (block_t, warps)) in itertools.product(
                              (80, 90), ("bf16", "fp16", "fp32"), rope._CONFIGS.items())
                          for d in (2 * block_h, 2 * block_h - 2)}


def test_benchmark_smoke(tmp_path):
    rows = rope_bench.main(["--toy", "--out", str(tmp_path)])
    csv_text = (tmp_path / "rope.csv").read_text().splitlines()
    assert csv_text[0].split(",") == list(rope_bench.COLUMNS)
    assert len(csv_text) == len(rows) + 1 and {r["provider"] for r in rows} >= {"triton", "torch"}
    assert all(r["GB/s"] > 0 for r in rows)
    assert (tmp_path / "rope.png").stat().st_size > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d", [64, 128])
def test_bf16_on_gpu(d):
    inp = make_inputs(4, 32, 8, 257, d, "padded", seed=d)
    want = run(reference.apply_rope, inp, torch.float64)
    check(run(kernels.apply_rope, inp, torch.bfloat16), want, run(TorchBackend().apply_rope, inp, torch.bfloat16), torch.bfloat16)
