"""Fused linear + cross-entropy (kernels.linear_cross_entropy and the torch backend's chunked
version) against the float64 reference formula: the loss and the gradients of h and the weight.

On the CPU the Triton kernel runs under the interpreter (conftest.py). fp32 must agree with float64
to a relative 1e-5; fp16 may be off by at most twice what eager fp16 (F.linear, then GPT.loss) is
off, or one fp16 ulp of the largest value. Outputs are allocated on NaN-poisoned memory, so a
gradient row the code forgets to write fails the test.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels
from benchmarks import loss as loss_bench
from engine import GPT, GPTConfig, reference
from engine.backends import chunked_linear_cross_entropy

lce = importlib.import_module("kernels.linear_cross_entropy")  # the module: the name is also the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("nan_poisoned_outputs")  # conftest.py: outputs start as NaN


def make_inputs(n, v, c, ignored=0.2, mask=False):
    """h [N, C], weight [V, C] in float64 (logits of a few units: a spread-out softmax), targets
    with a fraction `ignored` set to -1, and optionally a 0/1 loss mask."""
    h = torch.randn(n, c, dtype=torch.float64)
    weight = torch.randn(v, c, dtype=torch.float64) * 2 / c**0.5
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < ignored] = -1
    loss_mask = (torch.rand(n) < 0.7).double() if mask else None
    return h, weight, targets, loss_mask


def run(fn, h, weight, targets, loss_mask, dtype):
    """loss, dh, dweight of fn on the inputs cast to dtype, as float64."""
    h = h.to(DEVICE, dtype, copy=True).requires_grad_()
    weight = weight.to(DEVICE, dtype, copy=True).requires_grad_()
    mask = None if loss_mask is None else loss_mask.to(DEVICE)
    loss = fn(h, weight, targets.to(DEVICE), mask)
    loss.backward()
    return {"loss": loss.detach().double().cpu(), "dh": h.grad.double().cpu(), "dweight": weight.grad.double().cpu()}


def eager(h, weight, targets, loss_mask):
    """Today's path: the whole logits in the input dtype, then GPT.loss."""
    return GPT.loss(F.linear(h, weight)[None], targets[None], None if loss_mask is None else loss_mask[None])


IMPLS = {"kernel": kernels.linear_cross_entropy, "torch-chunked": chunked_linear_cross_entropy}


def check(got, want, eager_lowp=None, dtype=torch.float16):
    for name in want:
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite values (an unwritten output?)"
        err = (got[name] - want[name]).abs().max().item()
        scale = max(want[name].abs().max().item(), 1e-3)
        if eager_lowp is None:
            assert err / scale < 1e-5, f"{name}: relative error {err / scale:.2e}"
        else:
            bound = max(2 * (eager_lowp[name] - want[name]).abs().max().item(), torch.finfo(dtype).eps * scale) + 1e-5
            assert err <= bound, f"{name}: error {err:.2e} > max(2 x eager's error, 1 ulp) (+1e-5) = {bound:.2e}"


# (N, V, C): one token and a one-word vocabulary; several chunks of rows (200 rows of 64: 64, 64,
# 64, 8); two vocabulary tiles with a ragged end (5003 = 4096 + 907) at C = 256; many odd rows.
SIZES = [(1, 1, 16), (200, 1000, 16), (33, 5003, 256), (517, 37, 48)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}-V{}-C{}".format(*s))
def test_fp32_matches_float64_reference(impl, size):
    inp = make_inputs(*size, mask=size[0] > 100)
    want = run(reference.linear_cross_entropy, *inp, torch.float64)
    check(run(IMPLS[impl], *inp, torch.float32), want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size,dtype", [((200, 1000, 16), torch.float16), ((33, 5003, 64), torch.float16),
                                        ((200, 1000, 16), torch.bfloat16)], ids=["N200-fp16", "N33-V5003-fp16", "N200-bf16"])
def test_16bit_within_twice_eager_error(impl, size, dtype):
    """Over several chunks (N=200) too: dW sums in fp32, so it is no worse than eager's one matmul.
    (bf16 is safe in the interpreter here: the kernel has no tl.dot.)"""
    inp = make_inputs(*size)
    want = run(reference.linear_cross_entropy, *inp, torch.float64)
    check(run(IMPLS[impl], *inp, dtype), want, run(eager, *inp, dtype), dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dims_and_fractional_mask(impl):
    """h [B, T, C] as the model passes it; loss_mask weights that are not 0/1 (GPT.loss allows them)."""
    h, weight, targets, _ = make_inputs(24, 50, 16)
    mask = torch.rand(24, dtype=torch.float64)
    shaped = (h.view(2, 12, 16), weight, targets.view(2, 12), mask.view(2, 12))
    want = run(reference.linear_cross_entropy, h, weight, targets, mask, torch.float64)
    got = run(IMPLS[impl], *shaped, torch.float32)
    got["dh"] = got["dh"].view(24, 16)
    check(got, want)


@pytest.mark.parametrize("impl", [*IMPLS, "reference"])
@pytest.mark.parametrize("case", ["targets-ignored", "mask-zero", "no-tokens"])
def test_nothing_counted_gives_zero_loss_and_zero_gradients(impl, case):
    """GPT.loss's rule: the mean over no tokens is 0, and so are the gradients."""
    n = 0 if case == "no-tokens" else 9
    h, weight, targets, _ = make_inputs(n, 40, 16, ignored=1.0 if case == "targets-ignored" else 0.0)
    mask = torch.zeros(n, dtype=torch.float64) if case == "mask-zero" else None
    fn = IMPLS.get(impl, reference.linear_cross_entropy)
    got = run(fn, h, weight, targets, mask, torch.float32)
    assert got["loss"].item() == 0.0
    assert got["dh"].shape == h.shape and not got["dh"].any() and not got["dweight"].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_all_ignored_among_counted_rows(impl):
    """Ignored rows get exactly zero gradient; counted rows are unaffected by them."""
    h, weight, targets, _ = make_inputs(70, 90, 16, ignored=0.0)
    targets[10:40] = -1
    got = run(IMPLS[impl], h, weight, targets, None, torch.float32)
    assert not got["dh"][10:40].any()
    check(got, run(reference.linear_cross_entropy, h, weight, targets, None, torch.float64))


def test_sum_reduction_and_other_ignore_index():
    h, weight, targets, _ = make_inputs(30, 20, 16, ignored=0.0)
    targets[::3] = 7  # ignored: ignore_index=7
    want = run(lambda *a: reference.linear_cross_entropy(*a, ignore_index=7, reduction="sum"),
               h, weight, targets, None, torch.float64)
    check(run(lambda *a: kernels.linear_cross_entropy(*a, ignore_index=7, reduction="sum"),
              h, weight, targets, None, torch.float32), want)


def test_only_the_needed_gradients_and_no_grad():
    h, weight, targets, _ = make_inputs(20, 30, 16)
    h, weight = h.float().requires_grad_(), weight.float()
    kernels.linear_cross_entropy(h, weight, targets).backward()
    assert h.grad is not None and weight.grad is None
    with torch.no_grad():
        loss = kernels.linear_cross_entropy(h, weight, targets)
    assert not loss.requires_grad
    want = reference.linear_cross_entropy(h.detach().double(), weight.double(), targets)
    assert abs(loss.item() - want.item()) < 1e-5 * want.item()


def test_autocast_casts_like_linear():
    """Under CPU autocast (bf16) the fused loss sees h and weight in bf16, as F.linear would, and
    hands back gradients in the parameters' fp32."""
    h, weight, targets, _ = make_inputs(16, 40, 32)
    h, weight = h.float().requires_grad_(), weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kernels.linear_cross_entropy(h, weight, targets)
    loss.backward()
    assert h.grad.dtype == weight.grad.dtype == torch.float32
    assert loss.item() == kernels.linear_cross_entropy(h.detach().bfloat16(), weight.detach().bfloat16(), targets).item()


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(4, 8), torch.randn(5, 8).half(), torch.zeros(4, dtype=torch.long)), "float32"),
        ((torch.randn(4, 8).double(), torch.randn(5, 8).double(), torch.zeros(4, dtype=torch.long)), "float32"),
        ((torch.randn(4, 8), torch.randn(5, 7), torch.zeros(4, dtype=torch.long)), r"weight must be \[V >= 1, C\]"),
        ((torch.randn(4, 8), torch.randn(0, 8), torch.zeros(4, dtype=torch.long)), r"weight must be \[V >= 1, C\]"),
        ((torch.randn(4, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long)), "targets must be integer ids"),
        ((torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4)), "targets must be integer ids"),
        ((torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 5, 2])), r"targets must be in 0\.\.4"),
        ((torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, -2, 2])), r"targets must be in 0\.\.4"),
    ],
)
def test_bad_inputs_raise_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        kernels.linear_cross_entropy(*args)


def test_bad_mask_and_reduction_raise_value_error():
    h, w, t = torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="loss_mask must have targets' shape"):
        kernels.linear_cross_entropy(h, w, t, torch.ones(5))
    with pytest.raises(ValueError, match="reduction must be"):
        kernels.linear_cross_entropy(h, w, t, reduction="none")
    # an out-of-range target where nothing counts is not an error (GPT.loss ignores it too)
    assert kernels.linear_cross_entropy(h, w, torch.tensor([0, 1, 9, 2]), torch.tensor([1, 1, 0, 1])).isfinite()


def test_chunks_bound_the_logits():
    """A chunk holds at most 32 (kernel: 16, rounded up to a power of two) or 4 (torch) times h's
    elements, or 64 rows, and at most N rows."""
    from engine.backends import chunk_rows

    for n, c, v in [(16384, 2048, 131072), (4096, 768, 50257), (5, 16, 3), (517, 16, 5003)]:
        for rows, factor in ((lce._chunk_rows(n, c, v), 32), (chunk_rows(n, c, v), 4)):
            assert 1 <= rows <= n and (rows >= 64 or rows == n)
            assert rows * v <= max(factor * n * c + v, 64 * v)


def test_aot_builds_one_per_dtype_and_arch():
    configs = lce.aot_configs()
    assert sorted((c["arch"], c["config"].split()[0]) for c in configs) == sorted(
        (arch, dtype) for arch in (80, 90) for dtype in ("bf16", "fp16", "fp32"))
    for c in configs:
        z = c["launch"].args[0]
        assert z.stride(0) % 16 == 0 and z.shape[1] == 50257  # rows 16-aligned: one build per dtype


@pytest.mark.parametrize("preset,backend", [("tiny", "torch"), ("llama-tiny", "torch"), ("llama-tiny", "triton")])
def test_model_fused_loss_equals_logits_path(preset, backend):
    """GPT.forward(return_logits=False) gives (None, loss) with the default path's loss and gradients."""
    config = GPTConfig.from_preset(preset)
    config.n_layer = 1
    model = GPT(config, backend=backend)
    x = torch.randint(0, config.vocab_size, (2, 17))
    y = torch.randint(0, config.vocab_size, (2, 17))
    y[0, :5] = -1
    mask = torch.ones(2, 17)
    mask[1, 11:] = 0
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        logits, loss = model(x, y, mask, return_logits=return_logits)
        loss.backward()
        assert (logits is None) != return_logits
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (want, grads_want), (got, grads_got) = results
    assert abs(got - want) < 1e-5 * want
    for a, b in zip(grads_got, grads_want):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-7


def test_benchmark_smoke(tmp_path):
    rows = loss_bench.main(["--toy", "--out", str(tmp_path)])
    csv_text = (tmp_path / "loss.csv").read_text().splitlines()
    assert csv_text[0].split(",") == list(loss_bench.COLUMNS)
    assert len(csv_text) == len(rows) + 1 and {r["provider"] for r in rows} >= {"fused", "torch-chunked", "eager"}
    assert all(r["ms"] > 0 for r in rows)
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("size", [(4096, 50257, 768), (1000, 32000, 2048)], ids=lambda s: "N{}-V{}-C{}".format(*s))
def test_bf16_on_gpu(size):
    inp = make_inputs(*size)
    want = run(reference.linear_cross_entropy, *inp, torch.float64)
    check(run(kernels.linear_cross_entropy, *inp, torch.bfloat16), want, run(eager, *inp, torch.bfloat16), torch.bfloat16)
