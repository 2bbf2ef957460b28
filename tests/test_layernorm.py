"""kernels.layer_norm / add_layer_norm / LayerNorm against the float64 reference.

On the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
before triton is imported). fp32 must agree with float64 to a relative 1e-5; fp16 may be off by at
most twice what PyTorch's own fp16 computation is off (+1e-5). Outputs are allocated on
NaN-poisoned memory, so an element the kernels forget to write fails the test.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from benchmarks import layernorm as ln_bench
from engine import reference
from kernels import layernorm as ln

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# Leading shapes of 1 to 3 dims, holding 1, 3 and 257 rows.
LEADS = {1: (1,), 3: (3, 1, 1), 257: (1, 257)}


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Every torch.empty / empty_like in this test hands out NaN-filled memory."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))


def make_inputs(lead, n, seed=0, weight=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x = rand(*lead, n) * 2 + 0.5  # an offset mean: the variance must not cancel
    return {
        "x": x, "residual": rand(*lead, n), "dy": rand(*lead, n), "ds": rand(*lead, n),
        "weight": rand(n) if weight else None, "bias": rand(n) if bias else None,
    }


def run(fn, inp, dtype, add):
    """Outputs and input gradients of fn (kernel or reference) on inp cast to dtype, as float64."""
    leaves = {k: inp[k].to(DEVICE, dtype, copy=True).requires_grad_() for k in ("x", "residual", "weight", "bias") if inp[k] is not None}
    w, b = leaves.get("weight"), leaves.get("bias")
    if add:
        y, s = fn(leaves["x"], leaves["residual"], w, b, EPS)
        loss = (y * inp["dy"].to(DEVICE, dtype)).sum() + (s * inp["ds"].to(DEVICE, dtype)).sum()
        outs = {"y": y, "s": s}
    else:
        leaves.pop("residual")
        y = fn(leaves["x"], w, b, EPS)
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


@pytest.mark.parametrize("n,rows", [(8193, 3), (ln.MAX_N, 1)])
def test_long_rows_streamed_in_chunks(n, rows):
    """Rows longer than the largest register tile take the chunked path, up to the limit."""
    assert ln._pick(ln._BWD_CONFIGS, n)[3] and ln._pick(ln._FWD_CONFIGS, n)[3]
    inp = make_inputs((rows,), n, seed=n)
    want = run(reference.add_layer_norm, inp, torch.float64, True)
    check(run(kernels.add_layer_norm, inp, torch.float32, True), want)


def test_gradients_are_bitwise_deterministic():
    inp = make_inputs((257,), 100, seed=1)  # several programs, each summing several row blocks
    first = run(kernels.add_layer_norm, inp, torch.float32, True)
    second = run(kernels.add_layer_norm, inp, torch.float32, True)
    for name in first:
        assert torch.equal(first[name], second[name]), name


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
    model = GPT(config, backend="reference").to(DEVICE)
    idx = torch.randint(0, config.vocab_size, (2, 16), device=DEVICE)
    results = []
    for ops in (None, OurLayerNorms()):
        if ops is not None:
            monkeypatch.setattr(model, "ops_for", lambda device: ops)
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


def test_aot_configs_are_the_launch_tables():
    configs = ln.aot_configs()
    keys = {"kernel", "fn", "signature", "constexprs", "num_warps", "num_stages", "archs", "wgmma", "config"}
    assert all(set(c) == keys for c in configs)
    for c in configs:  # every parameter typed, in order
        assert list(c["signature"]) == c["fn"].arg_names
    shipped = {(c["kernel"], c["constexprs"].get("BLOCK_N"), c["constexprs"].get("ROWS"), c["num_warps"], c["constexprs"].get("CHUNKED")) for c in configs}
    for kernel, table in (("ln_fwd", ln._FWD_CONFIGS), ("ln_bwd_dx", ln._BWD_CONFIGS)):
        picked = {ln._pick(table, n) for n in range(1, ln.MAX_N + 1, 37)} | {ln._pick(table, 2 ** k) for k in range(17)}
        assert {(kernel, *cfg) for cfg in picked} == {s for s in shipped if s[0] == kernel}
    picked = {ln._pick_reduce(n) for n in range(1, ln.MAX_N + 1, 37)} | {ln._pick_reduce(ln.MAX_N)}
    shipped = {(c["constexprs"]["BLOCK_P"], c["constexprs"]["BLOCK_C"], c["num_warps"]) for c in configs if c["kernel"] == "ln_bwd_reduce"}
    assert picked == shipped


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
