"""kernels.swiglu against the float64 reference, forward and backward.

On the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
before triton is imported). fp32 must agree with float64 to a relative 1e-5; fp16 may be off by at
most twice what PyTorch's own fp16 F.silu(gate) * up is off, or one fp16 ulp of the largest value
(+1e-5). Outputs are allocated on
NaN-poisoned memory, so an element the kernels forget to write fails the test.
"""
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F
import triton

import kernels
from benchmarks import swiglu as swiglu_bench
from engine import reference
from kernels.launch import MAX_GRID

sw = importlib.import_module("kernels.swiglu")  # the module: `kernels.swiglu` is the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("nan_poisoned_outputs")  # conftest.py: outputs start as NaN


def make_inputs(lead, n, seed=0):
    """The [..., 2N] projection whose halves are gate and up (as in the model), and dy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, 2 * n, generator=g, dtype=torch.float64) * 3  # past silu's bend on both sides
    return {"x": x, "dy": torch.randn(*lead, n, generator=g, dtype=torch.float64)}


def run(fn, inp, dtype):
    """y and the gradients of gate and up of fn on inp cast to dtype, as float64."""
    x = inp["x"].to(DEVICE, dtype, copy=True).requires_grad_()
    y = fn(*x.chunk(2, dim=-1))
    y.backward(inp["dy"].to(DEVICE, dtype))
    dgate, dup = x.grad.chunk(2, dim=-1)
    outs = {"y": y, "dgate": dgate, "dup": dup}
    for name, t in outs.items():
        assert t.dtype == dtype, name
    return {k: t.detach().double().cpu() for k, t in outs.items()}


def torch_swiglu(gate, up):
    """PyTorch's two ops in the input dtype: the yardstick in fp16 / bf16."""
    return F.silu(gate) * up


def max_err(got, want):
    return (got - want).abs().max().item()


def check(got, want, torch_lowp=None, dtype=torch.float16):
    """fp32: relative max error < 1e-5. fp16/bf16 (torch_lowp given, dtype theirs): at most 2x torch's
    error or 1 ulp of the largest value, + 1e-5."""
    for name in want:
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite values (an unwritten output?)"
        err = max_err(got[name], want[name])
        scale = max(want[name].abs().max().item(), 1e-3)
        if torch_lowp is None:
            assert err / scale < 1e-5, f"{name}: relative error {err / scale:.2e}"
        else:
            # on a handful of elements torch may round luckily: one ulp of the largest value is allowed
            bound = max(2 * max_err(torch_lowp[name], want[name]), torch.finfo(dtype).eps * scale) + 1e-5
            assert err <= bound, f"{name}: error {err:.2e} > max(2 x torch's error, 1 ulp) (+1e-5) = {bound:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead", [(1,), (3, 1), (2, 129)], ids=["1row", "3rows", "258rows"])
@pytest.mark.parametrize("n", [1, 7, 64, 100, 2048, 2049, 5000])
def test_matches_float64_reference(n, lead, dtype):
    if n > 2048 and lead[-1] > 1:
        lead = (2, 3)  # wide rows: a few are enough (each is split into column blocks)
    inp = make_inputs(lead, n, seed=n * 10 + len(lead))
    want = run(reference.swiglu, inp, torch.float64)
    check(run(kernels.swiglu, inp, dtype), want, run(torch_swiglu, inp, dtype) if dtype == torch.float16 else None)


def test_non_contiguous_inputs_give_the_same_result():
    base = torch.randn(6, 5, 40, device=DEVICE)
    gate, up = base[..., :20], base[..., 20:]  # the model's halves: rows 40 apart
    want = kernels.swiglu(gate.contiguous(), up.contiguous())
    assert torch.equal(kernels.swiglu(gate, up), want)
    assert torch.equal(kernels.swiglu(gate.transpose(0, 1).contiguous().transpose(0, 1), up), want)  # copied rows
    assert torch.equal(kernels.swiglu(base[..., ::2], base[..., 1::2]),
                       kernels.swiglu(base[..., ::2].contiguous(), base[..., 1::2].contiguous()))  # stride 2
    x = base.requires_grad_()
    y = kernels.swiglu(x[..., :20], x[..., 20:])
    y.backward(torch.ones(1, 1, 20).expand_as(y))  # a broadcast (stride 0) gradient
    xr = base.detach().double().requires_grad_()
    reference.swiglu(xr[..., :20], xr[..., 20:]).sum().backward()
    assert max_err(x.grad.double(), xr.grad) < 1e-5 * xr.grad.abs().max().item()


def test_zero_rows():
    x = torch.randn(0, 3, 32, device=DEVICE, requires_grad=True)
    y = kernels.swiglu(*x.chunk(2, dim=-1))
    assert y.shape == (0, 3, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("m", [2**16, 2**31 - 1, 2**36])
def test_launch_grids_fit_cuda_limits(m):
    """Row blocks sit on grid axis x (up to 2^31 - 1 programs), column blocks on axis y; past it the
    launcher names the limit."""
    for n in (64, 200, 2048, 14336, 2**20):
        gate, up, dy = (torch.empty(m, n, device="meta") for _ in range(3))
        block_n, rows, _ = sw._pick(n)
        try:
            launches, _ = sw._forward_launches(gate, up)
        except ValueError as err:
            assert "CUDA's limit" in str(err) and triton.cdiv(m, rows) > MAX_GRID[0]
            continue
        launches += sw._backward_launches(dy, gate, up)[0]
        for launch in launches:
            assert launch.grid == (triton.cdiv(m, rows), triton.cdiv(n, block_n))
            assert all(1 <= g <= limit for g, limit in zip(launch.grid, MAX_GRID))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: kernels.swiglu(torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)), "float32"),
        (lambda: kernels.swiglu(torch.randn(2, 8), torch.randn(2, 8).half()), "float32"),
        (lambda: kernels.swiglu(torch.randn(2, 8), torch.randn(2, 7)), "up must have gate's shape"),
        (lambda: kernels.swiglu(torch.randn(()), torch.randn(())), "at least one dimension"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_aot_builds_are_every_launch_choice():
    """kernels/compile.py builds the launchers' own launches: every table entry, forward and backward,
    for each dtype, with N % 16 == 0 and not, per arch; each label is one build."""
    configs = sw.aot_configs()
    built = [(c["arch"], c["kernel"], *c["config"].split()[:2], c["launch"].constexprs["BLOCK_N"],
              c["launch"].constexprs["ROWS"], c["launch"].num_warps) for c in configs]
    assert len(set(built)) == len(built) == len({(c["arch"], c["kernel"], c["config"]) for c in configs})
    assert set(built) == {(arch, kernel, dtype, divisible, *cfg) for arch, kernel, dtype, divisible, cfg in itertools.product(
        (80, 90), ("swiglu_fwd", "swiglu_bwd"), ("bf16", "fp16", "fp32"), ("N%16=0", "N%16>0"), sw._CONFIGS)}


def test_benchmark_smoke(tmp_path):
    rows = swiglu_bench.main(["--toy", "--out", str(tmp_path)])
    csv_text = (tmp_path / "swiglu.csv").read_text().splitlines()
    assert csv_text[0].split(",") == list(swiglu_bench.COLUMNS)
    assert len(csv_text) == len(rows) + 1 and {r["provider"] for r in rows} >= {"triton", "torch"}
    assert all(r["GB/s"] > 0 for r in rows)
    assert (tmp_path / "swiglu.png").stat().st_size > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [1000, 14336])
def test_bf16_on_gpu(n):
    inp = make_inputs((4, 129), n, seed=n)
    want = run(reference.swiglu, inp, torch.float64)
    check(run(kernels.swiglu, inp, torch.bfloat16), want, run(torch_swiglu, inp, torch.bfloat16), torch.bfloat16)
