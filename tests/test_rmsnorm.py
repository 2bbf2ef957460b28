"""kernels.rms_norm / add_rms_norm / RMSNorm against the float64 reference.

On the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
before triton is imported). Each result may be off the float64 reference by at most twice what
PyTorch's own computation in the same dtype is off (+1e-5 in fp16 / bf16); in fp32 a relative 1e-5
is always allowed too. (fp32 needs torch's yardstick only where the result cancels: at N = 1,
dx = rstd * w*dy * (1 - xhat^2) with xhat^2 = x^2 / (x^2 + eps), about eps, where torch's own
relative error is ~3e-5.) Outputs are allocated on NaN-poisoned memory (test_layernorm's fixture),
so an element the kernels forget to write fails the test.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
import triton

import kernels
from benchmarks import layernorm as norm_bench
from engine import reference
from kernels import layernorm as ln
from kernels import rmsnorm
from kernels.launch import MAX_GRID
from test_layernorm import DEVICE, assert_bitwise_equal_over_3_runs, assert_ops_change_nothing, entry_sizes, max_err
from test_layernorm import run as layernorm_run

pytestmark = pytest.mark.usefixtures("nan_poisoned_outputs")  # conftest.py: outputs start as NaN

EPS = 1e-6
# Leading shapes of 1 to 3 dims, holding 1, 3 and 129 rows.
LEADS = {1: (1,), 3: (3, 1, 1), 129: (1, 129)}
# Past the forward's 8192 tile (its 16384 one) and past every backward table's last tile (chunked).
LONG_N = 8193


def make_inputs(lead, n, seed=0, weight=True):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return {"x": rand(*lead, n) * 2 + 0.5, "residual": rand(*lead, n), "dy": rand(*lead, n), "ds": rand(*lead, n),
            "weight": rand(n) if weight else None}


def run(fn, inp, dtype, add):
    return layernorm_run(fn, inp, dtype, add, params=("weight",), eps=EPS)


def torch_rms_norm(x, weight, eps):
    """The same computation done by PyTorch in the input dtype: the yardstick."""
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def torch_add_rms_norm(x, residual, weight, eps):
    s = x + residual
    return torch_rms_norm(s, weight, eps), s


def check(got, want, torch_same_dtype, dtype):
    """Every output within 2x torch's own error in this dtype (+1e-5 in fp16 / bf16); in fp32 a
    relative 1e-5 is enough. Returns the errors."""
    assert got.keys() == want.keys()
    errors = {}
    for name in want:
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite values (an unwritten output?)"
        err, torch_err = max_err(got[name], want[name]), max_err(torch_same_dtype[name], want[name])
        if dtype == torch.float32:
            bound = max(1e-5 * max(want[name].abs().max().item(), 1e-3), 2 * torch_err)
        else:
            bound = 2 * torch_err + 1e-5
        assert err <= bound, f"{name}: error {err:.2e} > bound {bound:.2e} (torch's error {torch_err:.2e})"
        errors[name] = err
    return errors


def compare(inp, dtype, add):
    want = run(reference.add_rms_norm if add else reference.rms_norm, inp, torch.float64, add)
    got = run(kernels.add_rms_norm if add else kernels.rms_norm, inp, dtype, add)
    return check(got, want, run(torch_add_rms_norm if add else torch_rms_norm, inp, dtype, add), dtype)


@pytest.mark.parametrize("add", [False, True], ids=["rms", "add_rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows", [1, 3, 129])
@pytest.mark.parametrize("n", [1, 7, 129, 1000, LONG_N])
def test_matches_float64_reference(n, rows, dtype, add):
    if n == LONG_N and rows == 129 and (dtype, add) != (torch.float32, True):
        pytest.skip("time (the interpreter): the chunked path walks 129 rows once, in fp32 with the residual")
    compare(make_inputs(LEADS[rows], n, seed=n * 1000 + rows), dtype, add)


@pytest.mark.parametrize("add", [False, True], ids=["rms", "add_rms"])
@pytest.mark.parametrize("n", [7, 1000, LONG_N])
def test_without_weight(n, add):
    compare(make_inputs((2, 3), n, seed=n, weight=False), torch.float32, add)


@pytest.mark.parametrize("layout", sorted(ln._BWD_CONFIGS))
def test_each_backward_layout_entry(layout, monkeypatch):
    """Both backward layouts, every entry (test_layernorm's sizes), with RMS on: 9 rows, fp32."""
    monkeypatch.setattr(ln, "BWD_LAYOUT", layout)
    for n in entry_sizes(ln._BWD_CONFIGS[layout]):
        compare(make_inputs((9,), n, seed=n), torch.float32, True)


def test_longest_rows():
    """N = MAX_N, the limit: the chunked kernels walk 8 (forward) and 32 (backward) chunks."""
    assert ln._pick(ln._FWD_CONFIGS, ln.MAX_N)[3] and all(ln._pick(t, ln.MAX_N)[3] for t in ln._BWD_CONFIGS.values())
    compare(make_inputs((1,), ln.MAX_N, seed=5), torch.float32, True)


def test_mixed_dtypes_follow_torch_promotion():
    """x fp16 + residual fp32 (a branch under autocast, the stream in fp32): s and y are fp32, and
    each input's gradient comes back in its own dtype."""
    x = torch.randn(4, 96, device=DEVICE, dtype=torch.float16, requires_grad=True)
    res = torch.randn(4, 96, device=DEVICE, requires_grad=True)
    w = torch.randn(96, device=DEVICE, requires_grad=True)
    y, s = kernels.add_rms_norm(x, res, w, EPS)
    assert y.dtype == s.dtype == torch.float32 and torch.equal(s, x.float() + res)
    y.sum().backward()
    assert x.grad.dtype == torch.float16 and res.grad.dtype == torch.float32
    assert torch.allclose(res.grad, x.grad.float(), atol=1e-3, rtol=1e-3)
    y_ref = reference.rms_norm((x.float() + res).double(), w.double(), EPS)
    assert max_err(y.double(), y_ref) < 1e-5 * y_ref.abs().max().item()


def test_non_contiguous_input_gives_the_same_result():
    base = torch.randn(64, 3, 40, device=DEVICE)
    w = torch.randn(64, device=DEVICE)
    x = base.transpose(0, 2)  # [40, 3, 64]: the normalised dim has stride 120
    assert torch.equal(kernels.rms_norm(x, w, EPS), kernels.rms_norm(x.contiguous(), w, EPS))
    x, res = base[:, 1, :], base[:, 2, :]  # rows 120 apart, unit stride along N
    w = torch.randn(80, device=DEVICE)[::2].requires_grad_()  # a strided weight
    y, s = kernels.add_rms_norm(x, res, w, EPS)
    assert torch.equal(s, x + res) and torch.equal(y, kernels.rms_norm(x + res, w.detach().contiguous(), EPS))
    y.sum().backward()
    assert torch.allclose(w.grad, kernels.rms_norm(x + res, None, EPS).sum(0), atol=1e-5)


def test_zero_rows():
    x = torch.randn(0, 3, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    y = kernels.rms_norm(x, w, EPS)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(16, device=DEVICE))


def test_rms_norm_module_is_a_drop_in():
    """kernels.RMSNorm loads torch.nn.RMSNorm's state_dict and gives its outputs and gradients,
    eps=None (torch's default: fp32's machine epsilon) included."""
    for shape, kwargs in (((48,), {}), ((4, 12), {"eps": 1e-6}), ((48,), {"elementwise_affine": False})):
        ours, theirs = kernels.RMSNorm(shape, **kwargs), torch.nn.RMSNorm(shape, **kwargs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert repr(ours).replace(type(ours).__name__, "") == repr(theirs).replace(type(theirs).__name__, "")
        for p in theirs.parameters():
            p.data.normal_()
        ours.load_state_dict(theirs.state_dict())
        for dtype, rel in ((torch.float32, 1e-5), (torch.float16, 4e-3)):  # fp16: a few ulps of the largest
            ours_d, theirs_d = ours.to(dtype), theirs.to(dtype)
            x = torch.randn(3, 5, *shape, dtype=dtype) * 1e-3  # small: eps matters
            xs = [x.clone().requires_grad_() for _ in range(2)]
            y_ours, y_theirs = ours_d(xs[0]), theirs_d(xs[1])
            dy = torch.randn_like(x)
            y_ours.backward(dy)
            y_theirs.backward(dy)
            pairs = [(y_ours, y_theirs), (xs[0].grad, xs[1].grad)]
            if ours_d.weight is not None:
                pairs.append((ours_d.weight.grad, theirs_d.weight.grad))
                ours_d.weight.grad = theirs_d.weight.grad = None
            for got, want in pairs:
                assert got.dtype == want.dtype == dtype
                assert max_err(got.double(), want.double()) <= rel * want.abs().max().item(), (shape, kwargs, dtype)
        ours.float(), theirs.float()
    with pytest.raises(ValueError, match="last dims"):
        kernels.RMSNorm(16)(torch.randn(2, 8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [1000, 20000], ids=["one_pass", "chunked"])
def test_gradients_are_bitwise_deterministic(n):
    """Bitwise-equal gradients over 3 runs with many programs per SM, each walking many row blocks
    (the interpreter runs programs one by one, so this could not fail there)."""
    assert_bitwise_equal_over_3_runs(run, kernels.add_rms_norm, make_inputs((2, 4096), n, seed=1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [768, 4096, 20000])
def test_bf16_on_gpu(n):
    compare(make_inputs((4, 129), n, seed=n), torch.bfloat16, True)


@pytest.mark.parametrize("m", [2**16, 2**31 - 1, 2**36])
def test_launch_grids_fit_cuda_limits(m):
    """Rows sit on grid axis x (up to 2^31 - 1 programs); past it the launcher names the limit."""
    for n in (64, 768, 8192, ln.MAX_N):
        x, residual, dy, ds = (torch.empty(m, n, device="meta") for _ in range(4))
        weight = torch.empty(n, device="meta")
        try:
            launches, _, s2, mean, rstd = ln._forward_launches(x, residual, weight, None, EPS, rms=True)
        except ValueError as err:
            assert "CUDA's limit" in str(err) and triton.cdiv(m, ln._pick(ln._FWD_CONFIGS, n)[1]) > MAX_GRID[0]
            continue
        assert mean is None and all(launch.constexprs["RMS"] for launch in launches)
        for layout in ln._BWD_CONFIGS:
            launches += ln._backward_launches(dy, ds, s2, weight, None, mean, rstd, num_sms=132, layout=layout)[0]
        for launch in launches:
            assert len(launch.grid) == 1 and 1 <= launch.grid[0] <= MAX_GRID[0]


def test_aot_builds_are_every_launch_choice():
    """kernels/compile.py builds the RMS launchers' own launches: every table entry of the forward
    and both backward kernels with RMS on, for each dtype, with N % 16 == 0 and not, per arch; the
    reduction is LayerNorm's build (same label, same specialisation)."""
    configs = rmsnorm.aot_configs()
    built = {(c["arch"], c["kernel"], c["config"].split()[0], c["config"].split()[1],
              c["launch"].constexprs.get("BLOCK_N"), c["launch"].constexprs.get("ROWS"), c["launch"].num_warps)
             for c in configs if c["kernel"] != "ln_bwd_reduce"}
    expected = set()
    for arch, dtype, divisible in itertools.product((80, 90), ("bf16", "fp16", "fp32"), ("N%16=0", "N%16>0")):
        for block_n, rows, warps, chunked in ln._FWD_CONFIGS:
            expected.add((arch, "rms_fwd", dtype, divisible, block_n, rows, warps))
        for block_n, rows, warps, chunked, *_ in itertools.chain(*ln._BWD_CONFIGS.values()):
            expected.add((arch, "rms_bwd_dx_chunked" if chunked else "rms_bwd_dx", dtype, divisible, block_n, rows, warps))
    assert built == expected
    for c in configs:
        rms = c["kernel"].startswith("rms_")
        assert c["launch"].constexprs.get("RMS", False) == rms and not c["launch"].constexprs.get("HAS_BIAS")
    ln_labels = {(c["kernel"], c["arch"], c["config"]) for c in ln.aot_configs()}
    assert {(c["kernel"], c["arch"], c["config"]) for c in configs if c["kernel"] == "ln_bwd_reduce"} <= ln_labels


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: kernels.rms_norm(torch.randn(2, ln.MAX_N + 1)), "65536"),
        (lambda: kernels.rms_norm(torch.randn(2, 0)), "65536"),
        (lambda: kernels.rms_norm(torch.randn(2, 8, dtype=torch.float64)), "x.dtype"),
        (lambda: kernels.rms_norm(torch.randn(2, 8), torch.randn(7)), "weight"),
        (lambda: kernels.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8)), "residual.shape"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_llama_with_our_rms_norms_matches_the_reference(monkeypatch):
    """The Llama blocks' (residual-add +) RMSNorm calls through our kernels change nothing: logits
    and every parameter's gradient."""
    from engine import GPT, GPTConfig
    from engine.backends import ReferenceBackend

    class OurRMSNorms(ReferenceBackend):
        def rms_norm(self, x, weight, eps):
            return kernels.rms_norm(x, weight, eps)

        def add_rms_norm(self, x, residual, weight, eps):
            return kernels.add_rms_norm(x, residual, weight, eps)

    torch.manual_seed(0)
    config = GPTConfig.from_preset("llama-tiny")
    config.n_layer, config.vocab_size = 2, 256
    model = GPT(config, backend="reference").to(DEVICE)
    for p in model.parameters():  # norms' weights away from 1, so a dropped weight shows
        p.data.add_(0.1 * torch.randn_like(p))
    assert_ops_change_nothing(model, OurRMSNorms(), monkeypatch)


def test_benchmark_smoke(tmp_path):
    rows = norm_bench.main(["--toy", "--op", "rmsnorm", "--out", str(tmp_path)])
    csv_text = (tmp_path / "rmsnorm.csv").read_text().splitlines()
    assert csv_text[0].split(",") == list(norm_bench.COLUMNS)
    assert len(csv_text) == len(rows) + 1 and {r["provider"] for r in rows} >= {"triton", "torch"}
    assert all(r["GB/s"] > 0 for r in rows)
    assert (tmp_path / "rmsnorm.png").stat().st_size > 0
