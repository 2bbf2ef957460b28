"""kernels.layer_norm / add_layer_norm / LayerNorm against the float64 reference.

On the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
before triton is imported). fp32 must agree with float64 to a relative 1e-5; fp16 may be off by at
most twice what PyTorch's own fp16 computation is off (+1e-5). Outputs are allocated on
NaN-poisoned memory, so an element the kernels forget to write fails the test.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
import triton

import kernels
from benchmarks import layernorm as ln_bench
from engine import reference
from kernels import layernorm as ln
from kernels.launch import MAX_GRID

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# Leading shapes of 1 to 3 dims, holding 1, 3 and 257 rows.
LEADS = {1: (1,), 3: (3, 1, 1), 257: (1, 257)}


pytestmark = pytest.mark.usefixtures("nan_poisoned_outputs")  # conftest.py: outputs start as NaN


def make_inputs(lead, n, seed=0, weight=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x = rand(*lead, n) * 2 + 0.5  # an offset mean: the variance must not cancel
    return {
        "x": x, "residual": rand(*lead, n), "dy": rand(*lead, n), "ds": rand(*lead, n),
        "weight": rand(n) if weight else None, "bias": rand(n) if bias else None,
    }


def run(fn, inp, dtype, add, params=("weight", "bias"), eps=EPS):
    """Outputs and input gradients of fn (kernel, reference or torch) on inp cast to dtype, as
    float64. fn takes (x, [residual,] *params, eps); test_rmsnorm passes params=("weight",)."""
    leaves = {k: inp[k].to(DEVICE, dtype, copy=True).requires_grad_() for k in ("x", "residual", *params) if inp[k] is not None}
    weights = [leaves.get(k) for k in params]
    if add:
        y, s = fn(leaves["x"], leaves["residual"], *weights, eps)
        loss = (y * inp["dy"].to(DEVICE, dtype)).sum() + (s * inp["ds"].to(DEVICE, dtype)).sum()
        outs = {"y": y, "s": s}
    else:
        leaves.pop("residual")
        y = fn(leaves["x"], *weights, eps)
        loss = (y * inp["dy"].to(DEVICE, dtype)).sum()
        outs = {"y": y}
    loss.backward()
    outs.update({f"d{k}": t.grad for k, t in leaves.items()})
    for name, t in outs.items():
        assert t.dtype == dtype, name
    return {k: t.detach().double().cpu() for k, t in outs.items()}


def torch_layer_norm(x, weight, bias, eps):
    """The same computation done by PyTorch in the input dtype: the yardstick in fp16 / bf16."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def torch_add_layer_norm(x, residual, weight, bias, eps):
    s = x + residual
    return torch_layer_norm(s, weight, bias, eps), s


def max_err(got, want):
    return (got - want).abs().max().item()


def check(got, want, torch_lowp=None):
    """fp32: relative max error < 1e-5. fp16/bf16 (torch_lowp given): at most 2x torch's error + 1e-5."""
    assert got.keys() == want.keys()
    for name in want:
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite values (an unwritten output?)"
        err = max_err(got[name], want[name])
        if torch_lowp is None:
            scale = max(want[name].abs().max().item(), 1e-3)
            assert err / scale < 1e-5, f"{name}: relative error {err / scale:.2e}"
        else:
            bound = 2 * max_err(torch_lowp[name], want[name]) + 1e-5
            assert err <= bound, f"{name}: error {err:.2e} > 2 x torch's error (+1e-5) = {bound:.2e}"


@pytest.mark.parametrize("add", [False, True], ids=["ln", "add_ln"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows", [1, 3, 257])
@pytest.mark.parametrize("n", [1, 7, 64, 100, 768, 1000, 4096])
def test_matches_float64_reference(n, rows, dtype, add):
    inp = make_inputs(LEADS[rows], n, seed=n * 1000 + rows)
    want = run(reference.add_layer_norm if add else reference.layer_norm, inp, torch.float64, add)
    got = run(kernels.add_layer_norm if add else kernels.layer_norm, inp, dtype, add)
    check(got, want, run(torch_add_layer_norm if add else torch_layer_norm, inp, dtype, add) if dtype == torch.float16 else None)


@pytest.mark.parametrize("affine", ["weight", "bias", "none"])
@pytest.mark.parametrize("add", [False, True], ids=["ln", "add_ln"])
@pytest.mark.parametrize("n", [7, 100, 1000])
def test_optional_weight_and_bias(n, add, affine):
    inp = make_inputs((2, 3), n, seed=n, weight=affine == "weight", bias=affine == "bias")
    want = run(reference.add_layer_norm if add else reference.layer_norm, inp, torch.float64, add)
    got = run(kernels.add_layer_norm if add else kernels.layer_norm, inp, torch.float32, add)
    check(got, want)


@pytest.mark.parametrize("n,rows", [(16385, 2), (ln.MAX_N, 1)])
def test_long_rows_streamed_in_chunks(n, rows):
    """Rows longer than the largest register tile take the chunked path, up to the limit."""
    assert ln._pick(ln._FWD_CONFIGS, n)[3] and all(ln._pick(table, n)[3] for table in ln._BWD_CONFIGS.values())
    inp = make_inputs((rows,), n, seed=n)
    want = run(reference.add_layer_norm, inp, torch.float64, True)
    check(run(kernels.add_layer_norm, inp, torch.float32, True), want)


def test_one_pass_forward_up_to_16384():
    """Rows of 8193 to 16384 features are read once in the forward (its 16384 tile)."""
    n = 12289
    assert not ln._pick(ln._FWD_CONFIGS, n)[3]
    inp = make_inputs((2,), n, seed=n)
    check(run(kernels.add_layer_norm, inp, torch.float32, True), run(reference.add_layer_norm, inp, torch.float64, True))


def entry_sizes(table):
    """An N with N % 16 > 0 that picks each entry of a backward table: one below the tile width, and
    for the chunked entry 2 chunks and 1 feature (a last chunk of one column)."""
    sizes = [2 * block_n + 1 if chunked else block_n - 1 for block_n, _, _, chunked, *_ in table]
    assert [ln._pick(table, n) for n in sizes] == list(table)
    return sizes


@pytest.mark.parametrize("layout", sorted(ln._BWD_CONFIGS))
def test_each_backward_layout_entry(layout, monkeypatch):
    """Both backward layouts, every entry (one build of each; the other specialisations are
    kernels/compile.py's), against float64 in fp32 on 9 rows."""
    monkeypatch.setattr(ln, "BWD_LAYOUT", layout)
    for n in entry_sizes(ln._BWD_CONFIGS[layout]):
        inp = make_inputs((9,), n, seed=n)
        want = run(reference.add_layer_norm, inp, torch.float64, True)
        check(run(kernels.add_layer_norm, inp, torch.float32, True), want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [1000, 20000], ids=["one_pass", "chunked"])
def test_gradients_are_bitwise_deterministic(n):
    """Bitwise-equal gradients over 3 runs with many programs per SM, each walking many row blocks
    (the interpreter runs programs one by one, so this could not fail there)."""
    assert_bitwise_equal_over_3_runs(run, kernels.add_layer_norm, make_inputs((2, 4096), n, seed=1))


def assert_bitwise_equal_over_3_runs(run_fn, fn, inp):
    """fn's outputs and input gradients on inp in bf16, as run_fn (this module's run, or
    test_rmsnorm's) gives them: the same bits every time."""
    first = run_fn(fn, inp, torch.bfloat16, True)
    for _ in range(2):
        again = run_fn(fn, inp, torch.bfloat16, True)
        for name in first:
            assert torch.equal(first[name], again[name]), name


@pytest.mark.parametrize("m", [2**16, 2**31 - 1, 2**36])
def test_launch_grids_fit_cuda_limits(m):
    """Rows sit on grid axis x (up to 2^31 - 1 programs); past it the launcher names the limit."""
    for n in (64, 768, 8192, ln.MAX_N):
        x, residual, dy, ds = (torch.empty(m, n, device="meta") for _ in range(4))
        weight, bias = torch.empty(n, device="meta"), torch.empty(n, device="meta")
        try:
            launches, _, s2, mean, rstd = ln._forward_launches(x, residual, weight, bias, EPS)
        except ValueError as err:
            assert "CUDA's limit" in str(err) and triton.cdiv(m, ln._pick(ln._FWD_CONFIGS, n)[1]) > MAX_GRID[0]
            continue
        for layout in ln._BWD_CONFIGS:
            launches += ln._backward_launches(dy, ds, s2, weight, bias, mean, rstd, num_sms=132, layout=layout)[0]
        for launch in launches:
            assert len(launch.grid) == 1 and 1 <= launch.grid[0] <= MAX_GRID[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs a CUDA GPU with 40 GB")
def test_rows_past_2_31_elements():
    """x of 2^31 + 2^22 elements: row offsets past 2^31 must be 64-bit. The first and last rows of
    y and dx against float64; dweight and dbias (sums over every row) against float64 too."""
    m, n = 2**31 // 4096 + 1024, 4096
    x = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(n, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    b = torch.randn(n, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
    y = kernels.layer_norm(x, w, b, EPS)
    y.backward(dy)
    for rows in (slice(0, 64), slice(m - 64, m)):
        xr = x.detach()[rows].double().requires_grad_()
        wr, br = (t.detach().double().requires_grad_() for t in (w, b))
        yr = reference.layer_norm(xr, wr, br, EPS)
        yr.backward(dy[rows].double())
        lo_x = x.detach()[rows].clone().requires_grad_()
        lo = torch_layer_norm(lo_x, w.detach(), b.detach(), EPS)
        lo.backward(dy[rows])
        assert max_err(y.detach()[rows].double(), yr) <= 2 * max_err(lo.detach().double(), yr) + 1e-5
        assert max_err(x.grad[rows].double(), xr.grad) <= 2 * max_err(lo_x.grad.double(), xr.grad) + 1e-5
    # dweight = sum over rows of dy * xhat, dbias = sum of dy: float64 in chunks of rows
    dw_ref = torch.zeros(n, dtype=torch.float64, device=DEVICE)
    for start in range(0, m, 2**16):
        xs = x.detach()[start:start + 2**16].double()
        xhat = (xs - xs.mean(1, keepdim=True)) * torch.rsqrt(xs.var(1, unbiased=False, keepdim=True) + EPS)
        dw_ref += (dy[start:start + 2**16].double() * xhat).sum(0)
    db_ref = sum(dy[start:start + 2**16].double().sum(0) for start in range(0, m, 2**16))
    assert max_err(w.grad.double(), dw_ref) <= 1e-2 * dw_ref.abs().max().item()
    assert max_err(b.grad.double(), db_ref) <= 1e-2 * db_ref.abs().max().item()


def test_non_contiguous_input_gives_the_same_result():
    base = torch.randn(64, 3, 40, device=DEVICE)
    w = torch.randn(64, device=DEVICE)
    x = base.transpose(0, 2)  # [40, 3, 64]: the normalised dim has stride 120
    assert torch.equal(kernels.layer_norm(x, w, None, EPS), kernels.layer_norm(x.contiguous(), w, None, EPS))
    x, res = base[:, 1, :], base[:, 2, :]  # rows 120 apart, unit stride along N
    w = torch.randn(80, device=DEVICE)[::2].requires_grad_()  # a strided weight
    y, s = kernels.add_layer_norm(x, res, w, None, EPS)
    assert torch.equal(s, x + res)
    assert torch.equal(y, kernels.layer_norm(x + res, w.detach().contiguous(), None, EPS))
    y.sum().backward()
    assert torch.allclose(w.grad, kernels.layer_norm(x + res, None, None, EPS).sum(0), atol=1e-5)


def test_zero_rows():
    x = torch.randn(0, 3, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    b = torch.randn(16, device=DEVICE, requires_grad=True)
    y = kernels.layer_norm(x, w, b, EPS)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(16, device=DEVICE)) and torch.equal(b.grad, torch.zeros(16, device=DEVICE))


def test_residual_gradient_reaches_both_inputs_and_s():
    """s feeds later layers: its incoming gradient adds to the one through y (model usage)."""
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    res = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(32, device=DEVICE, requires_grad=True)
    y, s = kernels.add_layer_norm(x, res, w, None, EPS)
    (y.square().sum() + 3 * s.sum()).backward()
    x_ref, res_ref, w_ref = (t.detach().double().requires_grad_() for t in (x, res, w))
    y_ref, s_ref = reference.add_layer_norm(x_ref, res_ref, w_ref, None, EPS)
    (y_ref.square().sum() + 3 * s_ref.sum()).backward()
    for got, want in ((x.grad, x_ref.grad), (res.grad, res_ref.grad), (w.grad, w_ref.grad)):
        assert max_err(got.double(), want) < 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("bias", [True, False])
def test_gpt_with_our_layer_norms_matches_the_reference(monkeypatch, bias):
    """The GPT blocks' (residual-add +) LayerNorm calls through our kernels change nothing."""
    from engine import GPT, GPTConfig
    from engine.backends import ReferenceBackend

    class OurLayerNorms(ReferenceBackend):
        def layer_norm(self, x, weight, bias, eps):
            return kernels.layer_norm(x, weight, bias, eps)

        def add_layer_norm(self, x, residual, weight, bias, eps):
            return kernels.add_layer_norm(x, residual, weight, bias, eps)

    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny")
    config.bias = bias
    assert_ops_change_nothing(GPT(config, backend="reference").to(DEVICE), OurLayerNorms(), monkeypatch)


def assert_ops_change_nothing(model, ops, monkeypatch):
    """The model's logits and every parameter's gradient with `ops` in place of its reference
    backend: within fp32 rounding of the reference's."""
    idx = torch.randint(0, model.config.vocab_size, (2, 16), device=DEVICE)
    results = []
    for backend in (None, ops):
        if backend is not None:
            monkeypatch.setattr(model, "ops_for", lambda device: backend)
        model.zero_grad()
        logits, loss = model(idx, targets=idx)
        loss.backward()
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
    for want, got in zip(*results):
        assert max_err(got.double(), want.double()) <= 1e-5 * max(want.abs().max().item(), 1e-3)


def test_layer_norm_module_is_a_drop_in():
    for shape, kwargs in (((48,), {}), ((4, 12), {}), ((48,), {"elementwise_affine": False}), ((48,), {"bias": False})):
        torch.manual_seed(0)
        ours, theirs = kernels.LayerNorm(shape, eps=1e-6, **kwargs), torch.nn.LayerNorm(shape, eps=1e-6, **kwargs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert repr(ours).replace(type(ours).__name__, "") == repr(theirs).replace(type(theirs).__name__, "")
        for p in theirs.parameters():
            p.data.normal_()
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(3, *shape)
        assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: kernels.layer_norm(torch.randn(2, ln.MAX_N + 1)), "65536"),
        (lambda: kernels.layer_norm(torch.randn(2, 0)), "65536"),
        (lambda: kernels.layer_norm(torch.randn(2, 8, dtype=torch.float64)), "x.dtype"),
        (lambda: kernels.layer_norm(torch.randn(2, 8), torch.randn(7)), "weight"),
        (lambda: kernels.layer_norm(torch.randn(2, 8), None, torch.randn(8, 1)), "bias"),
        (lambda: kernels.add_layer_norm(torch.randn(2, 8), torch.randn(3, 8)), "residual.shape"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_aot_builds_are_every_launch_choice():
    """kernels/compile.py builds the launchers' own launches: every table entry (forward, both backward
    kernels in both layouts, the reduction) for each dtype, with N % 16 == 0 and not, per arch."""
    built = {(c["arch"], c["kernel"], c["config"].split()[0], c["config"].split()[1],
              c["launch"].constexprs.get("BLOCK_N"), c["launch"].constexprs.get("ROWS"), c["launch"].num_warps)
             for c in ln.aot_configs() if c["kernel"] != "ln_bwd_reduce"}
    expected = set()
    for arch, dtype, divisible in itertools.product((80, 90), ("bf16", "fp16", "fp32"), ("N%16=0", "N%16>0")):
        for block_n, rows, warps, chunked in ln._FWD_CONFIGS:
            expected.add((arch, "ln_fwd", dtype, divisible, block_n, rows, warps))
        for block_n, rows, warps, chunked, *_ in itertools.chain(*ln._BWD_CONFIGS.values()):
            expected.add((arch, "ln_bwd_dx_chunked" if chunked else "ln_bwd_dx", dtype, divisible, block_n, rows, warps))
    assert built == expected
    reduce = {(c["arch"], c["config"].split()[0], c["config"].split()[1], c["launch"].constexprs["BLOCK_P"],
               c["launch"].constexprs["BLOCK_C"], c["launch"].num_warps) for c in ln.aot_configs() if c["kernel"] == "ln_bwd_reduce"}
    assert reduce == {(arch, dtype, divisible, *cfg[1:]) for arch, dtype, divisible, cfg in itertools.product(
        (80, 90), ("bf16", "fp16", "fp32"), ("N%16=0", "N%16>0"), ln._REDUCE_CONFIGS)}


def test_benchmark_smoke(tmp_path):
    rows = ln_bench.main(["--toy", "--out", str(tmp_path)])
    csv_text = (tmp_path / "layernorm.csv").read_text().splitlines()
    assert csv_text[0].split(",") == list(ln_bench.COLUMNS)
    assert len(csv_text) == len(rows) + 1 and {r["provider"] for r in rows} >= {"triton", "torch"}
    assert all(r["GB/s"] > 0 for r in rows)
    assert (tmp_path / "layernorm.png").stat().st_size > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [768, 4096, 20000])
def test_bf16_on_gpu(n):
    inp = make_inputs((4, 129), n, seed=n)
    want = run(reference.add_layer_norm, inp, torch.float64, True)
    got = run(kernels.add_layer_norm, inp, torch.bfloat16, True)
    check(got, want, run(torch_add_layer_norm, inp, torch.bfloat16, True))
