"""kernels.flash_attention against the float64 reference (engine/reference.py).

Without CUDA the Triton kernels run in the interpreter on the CPU (conftest.py sets
TRITON_INTERPRET=1 before the kernels are imported); with CUDA the same tests run the compiled
kernels. Accuracy rules: fp32 relative error (max |err| / max |ref|, the denominator at least
1, the inputs' scale) below 1e-5; fp16 max error at most 2x (+1e-5) that of the same computation done by PyTorch in fp16, both
against float64 (FlashAttention's rule). Every buffer the kernels allocate with torch.empty
starts as NaN, so an element a kernel forgets to write fails the comparison.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import reference
from kernels import attention as attn
from kernels import flash_attention

ROOT = Path(__file__).resolve().parents[1]
on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

SIZES = (1, 7, 64, 129, 300)
PAIRS = [(sq, sk) for sq in SIZES for sk in SIZES if sq <= sk]
HEAD_DIMS = (16, 32, 64, 128)


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Floating-point torch.empty buffers (outputs, partials, statistics, gradients) start as NaN."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def make_inputs(b, h, sq, sk, d, dtype, device=DEVICE):
    q, k, v = (torch.randn(b, h, s, d, dtype=dtype, device=device) for s in (sq, sk, sk))
    return q, k, v, torch.randn(b, h, sq, d, dtype=dtype, device=device)


def run(fn, q, k, v, do, **kw):
    """Output and (dq, dk, dv) of fn, computed in the inputs' dtype."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, **kw)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def torch_fp16(q, k, v, causal=True, kv_start=None):
    """The attention formula run by PyTorch entirely in the inputs' dtype (no upcast)."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = reference.attention_mask(q.shape[-2], k.shape[-2], causal, kv_start, device=q.device)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def max_err(x, ref):
    return (x.double() - ref).abs().max().item()


def check(b, h, sq, sk, d, dtype, causal, kv_start=None, grads=True, deterministic=True):
    check_inputs(*make_inputs(b, h, sq, sk, d, dtype), causal, kv_start, grads, deterministic)


def check_inputs(q, k, v, do, causal, kv_start=None, grads=True, deterministic=True):
    """Output (and gradients) of flash_attention on these inputs against float64, by the module's rules."""
    dtype = q.dtype
    kw = dict(causal=causal, kv_start=kv_start)
    if not grads:
        with torch.no_grad():
            got = [flash_attention(q, k, v, **kw)]
            truth = [reference.attention(q.double(), k.double(), v.double(), **kw)]
            low = [torch_fp16(q, k, v, **kw)]
    else:
        got = run(flash_attention, q, k, v, do, deterministic=deterministic, **kw)
        truth = run(reference.attention, q.double(), k.double(), v.double(), do.double(), **kw)
        low = run(torch_fp16, q, k, v, do, **kw) if dtype != torch.float32 else None
    for i, name in enumerate(("o", "dq", "dk", "dv")[: len(got)]):
        assert got[i].shape == truth[i].shape and got[i].dtype == dtype, name
        err = max_err(got[i], truth[i])
        if dtype == torch.float32:
            # relative to the largest reference value, at least the inputs' scale 1 (dq, dk are 0 at Sk = 1)
            rel = err / max(truth[i].abs().max().item(), 1.0)
            assert rel < 1e-5, f"{name}: relative error {rel:.2e}"
        else:
            bound = 2 * max_err(low[i], truth[i]) + 1e-5
            assert err <= bound, f"{name}: max error {err:.2e} > {bound:.2e} (2x PyTorch fp16 + 1e-5)"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("sq,sk", PAIRS)
def test_shapes(sq, sk, causal):
    """Every (Sq, Sk) pair both ways; D, dtype, B and H rotate through their values."""
    i = PAIRS.index((sq, sk)) * 2 + causal
    d = HEAD_DIMS[i % 4]
    dtype = (torch.float32, torch.float16)[(i // 4) % 2]
    b, h = ((1, 3), (2, 1), (2, 3), (1, 1))[(i // 2) % 4]
    check(b, h, sq, sk, d, dtype, causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims(d, dtype):
    check(2, 3, 64, 129, d, dtype, causal=True)


@pytest.mark.parametrize("sq,sk", [(300, 300), (1, 300), (7, 129)])
def test_kv_start_matches_reference(sq, sk):
    """Left-padded rows: the padding mask of engine.reference.attention_mask, forward and backward."""
    kv_start = torch.tensor([0, 5, sk - 1], device=DEVICE)[: 2 if sq == 1 else 3]
    check(len(kv_start), 2, sq, sk, 32, torch.float32, causal=True, kv_start=kv_start)


def test_decode_splits_keys():
    """The decode shape (Sq=1, long cache) takes the split-KV path and its combine."""
    c = attn._config("decode", 64, torch.float16, torch.device(DEVICE))
    assert attn._num_splits(1 * 2, 1, 300, c.block_n, torch.device(DEVICE)) > 1
    check(1, 2, 1, 300, 64, torch.float16, causal=True, grads=False)
    check(1, 2, 16, 300, 64, torch.float32, causal=False)
    kv_start = torch.tensor([40], device=DEVICE)  # the first splits of the padding query see no key
    check(1, 2, 1, 300, 64, torch.float32, causal=True, kv_start=kv_start)


def test_noncontiguous_inputs():
    """[B, S, H, D] storage seen as [B, H, S, D] (strided heads), and a strided head dim."""
    b, h, s, d = 2, 3, 70, 32
    q, k, v = (torch.randn(b, s, h, d, device=DEVICE).transpose(1, 2) for _ in range(3))
    k_wide = torch.randn(b, h, s, 2 * d, device=DEVICE)[..., ::2]
    for kk in (k, k_wide):
        assert not kk.is_contiguous()
        do = torch.randn(b, h, s, d, device=DEVICE).transpose(2, 3).contiguous().transpose(2, 3)
        got = run(flash_attention, q, kk, v, do, causal=True)
        truth = run(reference.attention, q.double(), kk.double(), v.double(), do.double(), causal=True)
        for x, ref in zip(got, truth):
            assert max_err(x, ref) / ref.abs().max().item() < 1e-5


def test_sm_scale():
    q, k, v, _ = make_inputs(1, 1, 20, 40, 16, torch.float32)
    got = flash_attention(q, k, v, causal=False, sm_scale=0.3)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=False, sm_scale=0.3)
    assert max_err(got, ref) < 1e-5


@pytest.mark.parametrize("sq,sk,d,dtype,causal", [
    (129, 300, 64, torch.float16, True), (64, 64, 128, torch.float32, False), (1, 7, 16, torch.float32, True),
])
def test_atomic_dq_backward(sq, sk, d, dtype, causal):
    """deterministic=False: dQ accumulated with atomics inside the dK/dV kernel."""
    check(2, 3, sq, sk, d, dtype, causal, deterministic=False)
    check(2, 1, sq, sk, d, dtype, causal, kv_start=torch.tensor([0, sk // 2], device=DEVICE), deterministic=False)


@pytest.mark.parametrize("deterministic", [True, False], ids=["separate_dq", "atomic_dq"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("sq,sk", [(40, 40), (17, 40), (1, 40)])
def test_ragged_key_tile_with_very_negative_logits(sq, sk, causal, deterministic):
    """Sk = 40 leaves every key tile partial, and logits near -25 make lse so negative that a padding
    key (zero-filled, score 0) would get p = exp2(-lse), past fp16's range: the backward must keep
    the padding keys masked in every pass, or inf · 0 turns dQ into NaN."""
    q = (2.5 + 0.1 * torch.randn(1, 1, sq, 16, device=DEVICE)).half()
    k = (-2.5 + 0.1 * torch.randn(1, 1, sk, 16, device=DEVICE)).half()
    v, do = torch.randn(1, 1, sk, 16, device=DEVICE).half(), torch.randn(1, 1, sq, 16, device=DEVICE).half()
    for got in run(flash_attention, q, k, v, do, causal=causal, deterministic=deterministic):
        assert torch.isfinite(got).all()
    check_inputs(q, k, v, do, causal, deterministic=deterministic)


def test_backward_is_deterministic():
    q, k, v, do = make_inputs(2, 3, 129, 300, 64, torch.float16)
    first = run(flash_attention, q, k, v, do, causal=True)
    second = run(flash_attention, q, k, v, do, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shapes,match", [
    (((1, 1, 4, 48), (1, 1, 4, 48)), r"\(16, 32, 64, 128\)"),
    (((1, 1, 8, 16), (1, 1, 4, 16)), "Sq <= Sk"),
    (((1, 1, 4, 16), (1, 2, 4, 16)), r"\[B, H, Sk, D\]"),
    (((1, 4, 16), (1, 4, 16)), "4-D"),
])
def test_rejects_bad_shapes(shapes, match):
    q, k = (torch.randn(s, device=DEVICE) for s in shapes)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, k.clone())


def test_rejects_bad_dtype_and_kv_start():
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="kv_start"):
        flash_attention(q, q, q, kv_start=torch.zeros(2, dtype=torch.long, device=DEVICE))


def test_aot_configs_match_launcher_table():
    """What compile.py builds is what the launcher can pick: every table entry is listed."""
    listed = [(c["kernel"].removesuffix("_atomic"), c["archs"], c["constexprs"]["HEAD_DIM"],
               c["constexprs"].get("BLOCK_M"), c["constexprs"].get("BLOCK_N"), c["num_warps"], c["num_stages"],
               c["signature"]["Q"][1:] != "fp32")
              for c in attn.aot_configs() if "BLOCK_N" in c["constexprs"]]
    table = {(f"attn_{kind}", (arch,), d, c.block_m, c.block_n, c.num_warps, c.num_stages, half)
             for (arch, kind, half), per_d in attn._CONFIGS.items() for d, c in per_d.items()}
    assert set(listed) == table
    assert sum(key[0] == "attn_dkdv" for key in listed) == 2 * sum(key[0] == "attn_dkdv" for key in table)


@on_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_on_gpu(causal):
    """bf16 only on a GPU (the interpreter's bf16 tl.dot is wrong); same 2x rule vs PyTorch bf16."""
    for sq, sk, d in ((300, 300, 128), (1, 4096, 64), (129, 1000, 64)):
        check(2, 3, sq, sk, d, torch.bfloat16, causal)


def test_benchmark_smoke(tmp_path):
    """benchmarks/attention.py --toy runs on the CPU (interpreter) and writes its CSV and plot."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--toy", "--out", str(tmp_path)],
                   check=True, env=env, cwd=ROOT, timeout=300)
    csvs = sorted(tmp_path.glob("*.csv"))
    assert csvs, "no CSV written"
    header = csvs[0].read_text().splitlines()[0].split(",")
    assert {"mode", "impl", "seqlen", "head_dim", "causal", "ms", "tflops"} <= set(header)
    assert list(tmp_path.glob("*.png"))
