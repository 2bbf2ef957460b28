"""The CPU decode attention (engine._decode_attention, used by the torch backend for one query per
row) against the reference: odd sizes, grouped heads, left padding, static-cache lengths, strided
cache views, float32 and float64, one thread and torch's OpenMP threads, a forked child, and bad input."""
import os
import signal
import threading
import time

import pytest
import torch

from engine import reference
from engine.backends import ReferenceBackend, TorchBackend, cpu_decode_attention

_ext = pytest.importorskip("engine._decode_attention", reason="the C++ extension engine._decode_attention is not built (pip install -e .)")

TOL = {torch.float32: 2e-6, torch.float64: 1e-13}


def cache_views(B, Hkv, S, D, dtype, spare=3):
    """k, v as attention reads them from a KVCache: the first S columns of a longer buffer."""
    k = torch.randn(B, Hkv, S + spare, D, dtype=dtype)
    v = torch.randn(B, Hkv, S + spare, D, dtype=dtype)
    return k.narrow(2, 0, S), v.narrow(2, 0, S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,H,Hkv,S,D", [(1, 1, 1, 1, 32), (3, 6, 6, 7, 32), (2, 8, 2, 129, 64), (5, 4, 1, 1000, 128),
                                         (2, 3, 3, 33, 80), (1, 2, 1, 5, 1), (2, 2, 1, 3, 1500), (64, 6, 6, 90, 32)])
def test_matches_the_reference(B, H, Hkv, S, D, dtype):
    q = torch.randn(B, H, 1, D, dtype=dtype) * 3  # sharper softmax than unit scores
    k, v = cache_views(B, Hkv, S, D, dtype)
    out = cpu_decode_attention(q, k, v)
    assert out is not None and out.shape == (B, H, 1, D)
    want = reference.attention(q.double(), k.double(), v.double(), causal=True).to(dtype)
    # a D-long dot product's rounding grows as sqrt(D): at D = 1500 float32 passed 2e-6 in 2 seeds of
    # 40 (max 2.8e-6 over 300 seeds)
    tol = TOL[dtype] * max(1.0, (D / 128) ** 0.5)
    torch.testing.assert_close(out, want, atol=tol, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_left_padding_and_static_lengths(dtype):
    B, H, Hkv, S, D = 5, 4, 2, 40, 32
    q = torch.randn(B, H, 1, D, dtype=dtype)
    k, v = cache_views(B, Hkv, S, D, dtype)
    kv_start = torch.tensor([0, 3, 17, 38, 0])
    kv_lens = torch.tensor([40, 4, 39, 40, 1])
    for start, lens in ((kv_start, None), (None, kv_lens), (kv_start, kv_lens)):
        out = cpu_decode_attention(q, k, v, kv_start=start, kv_lens=lens)
        want = reference.attention(q.double(), k.double(), v.double(), causal=True, kv_start=start, kv_lens=lens)
        torch.testing.assert_close(out, want.to(dtype), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,H,Hkv,D,start", [(1, 6, 6, 32, 0), (3, 8, 2, 64, 40), (2, 4, 4, 24, 128)])
def test_appending_to_the_cache_matches_write_then_attend(B, H, Hkv, D, start, dtype):
    """attention_with_cache: the torch backend's one call (C++ writes the step's k, v into the cache and
    attends) against the reference backend's write-then-attend, on the same left-padded cache."""
    max_len = 129
    q = torch.randn(B, H, 1, D, dtype=dtype)
    k, v = torch.randn(B, Hkv, 1, D, dtype=dtype), torch.randn(B, Hkv, 1, D, dtype=dtype)
    caches = torch.randn(2, B, Hkv, max_len, D, dtype=dtype)
    ours, theirs = caches.clone(), caches.clone()
    kv_start = torch.randint(0, start + 1, (B,)) if start else None
    out = TorchBackend().attention_with_cache(q, k, v, ours[0], ours[1], start, kv_start)
    want = ReferenceBackend().attention_with_cache(q, k, v, theirs[0], theirs[1], start, kv_start)
    assert torch.equal(ours, theirs)  # the same column written, nothing else touched
    torch.testing.assert_close(out, want, atol=TOL[dtype], rtol=TOL[dtype])


def test_torchs_openmp_threads_give_the_one_thread_result():
    """Big enough to be spread over torch's OpenMP threads (>= 2^16 bytes of cache): bit-identical
    to one thread, and the call really went to the OpenMP runtime."""
    q = torch.randn(32, 8, 1, 64)
    k, v = cache_views(32, 8, 300, 64, torch.float32)
    lens = torch.randint(1, 301, (32,))
    one = _ext.decode_attention(q, k, v, None, lens, 0.125, 1)
    calls = _ext.pool_calls()
    four = _ext.decode_attention(q, k, v, None, lens, 0.125, 4)
    assert _ext.pool_calls() == calls + 1
    assert (one == four).all()
    small = torch.randn(1, 2, 1, 8), *cache_views(1, 2, 5, 8, torch.float32)  # 320 bytes: one thread
    _ext.decode_attention(*small, None, None, 0.5, 4)
    assert _ext.pool_calls() == calls + 1


def test_python_threads_calling_at_once_each_get_their_own_result():
    """A server may run generations in Python threads: calls that reach the OpenMP runtime at the
    same time (the GIL is released inside) each get their own team and the one-thread result."""
    cases = []
    for i in range(4):
        q = torch.randn(8 + i, 4, 1, 32)
        k, v = cache_views(8 + i, 4, 150 + 7 * i, 32, torch.float32)
        cases.append(((q, k, v), _ext.decode_attention(q, k, v, None, None, 0.2, 1)))
    results = [None] * 8

    def work(slot):
        args, _ = cases[slot % 4]
        results[slot] = [_ext.decode_attention(*args, None, None, 0.2, 2) for _ in range(20)]

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for slot, outs in enumerate(results):
        assert all((out == cases[slot % 4][1]).all() for out in outs)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_runs_alone_instead_of_hanging():
    """An OpenMP runtime's threads do not survive a fork (torch's own ops hang in such a child):
    after the parent used them, a child's call runs on its one thread and gives the same result."""
    q = torch.randn(16, 4, 1, 32)
    k, v = cache_views(16, 4, 200, 32, torch.float32)
    want = _ext.decode_attention(q, k, v, None, None, 0.2, 2)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it got the same numbers, then leave without cleanup
        try:
            same = bool((_ext.decode_attention(q, k, v, None, None, 0.2, 2) == want).all())
            os.write(write, b"same" if same else b"different")
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in decode_attention")
        time.sleep(0.01)
    assert os.read(read, 16) == b"same"
    os.close(read)


def test_extreme_scores_and_nan():
    """Scores of ±1e4 (exp underflows for all but the best key) stay finite; a NaN in a key gives
    that row NaN, not a silent number."""
    q = torch.full((2, 1, 1, 4), 100.0)
    k = torch.randn(2, 1, 9, 4) * 50
    v = torch.randn(2, 1, 9, 4)
    out = cpu_decode_attention(q, k, v)
    want = reference.attention(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out, want.float(), atol=1e-5, rtol=1e-5)
    k[1, 0, 4, 2] = float("nan")
    out = cpu_decode_attention(q, k, v)
    assert out[1].isnan().all() and not out[0].isnan().any()


def test_where_it_does_not_apply_the_backend_uses_sdpa():
    q = torch.randn(2, 2, 1, 16)
    k = torch.randn(2, 2, 5, 16)
    assert cpu_decode_attention(q.half(), k.half(), k.half()) is None  # not float32/float64
    assert cpu_decode_attention(torch.randn(2, 2, 3, 16), k, k) is None  # three queries
    assert cpu_decode_attention(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), k) is None  # D strided
    with torch.enable_grad():
        assert cpu_decode_attention(q.requires_grad_(), k, k) is None  # autograd needs SDPA's backward
        out = TorchBackend().attention(q, k, k)
        out.sum().backward()
        assert q.grad is not None


def test_bad_lengths_raise_naming_the_row():
    q = torch.randn(3, 2, 1, 8)
    k = torch.randn(3, 2, 6, 8)
    with pytest.raises(ValueError, match=r"row 1 would attend to keys \[4, 4\)"):
        cpu_decode_attention(q, k, k, kv_start=torch.tensor([0, 4, 0]), kv_lens=torch.tensor([6, 4, 6]))
    with pytest.raises(ValueError, match=r"row 2 .*kv_lens <= S=6"):
        cpu_decode_attention(q, k, k, kv_lens=torch.tensor([6, 6, 7]))
    with pytest.raises(ValueError, match="kv_start must be"):
        cpu_decode_attention(q, k, k, kv_start=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="Hkv dividing"):
        cpu_decode_attention(torch.randn(3, 3, 1, 8), k, k)
    new = torch.randn(3, 2, 1, 8)
    with pytest.raises(ValueError, match=r"at=6 is not a column of the cache \[0, S=6\)"):
        cpu_decode_attention(q, k, k.clone(), new_k=new, new_v=new, at=6)
    with pytest.raises(ValueError, match="new_k and new_v go together"):
        _ext.decode_attention(q, k, k, None, None, 1.0, 1, new, None, 2)
    with pytest.raises(ValueError, match="kv_lens is at"):
        cpu_decode_attention(q, k, k.clone(), kv_lens=torch.tensor([6, 6, 6]), new_k=new, new_v=new, at=2)
    with pytest.raises(ValueError, match=r"new_k must be \[B=3, 2, 1, D=8\]"):
        cpu_decode_attention(q, k, k.clone(), new_k=new[:2], new_v=new[:2], at=2)
    with pytest.raises(ValueError, match=r"v must be \[B=3, 2, 6, D=8\] of q's dtype, its last dimension contiguous"):
        _ext.decode_attention(q, k, k.double(), None, None, 1.0, 1)  # (the Python side falls back on a dtype mismatch)
    with pytest.raises(ValueError, match=r"kv_start must be an int64 tensor \[B=3\]"):
        _ext.decode_attention(q, k, k, torch.zeros(3, dtype=torch.int32), None, 1.0, 1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_decode_steps_at_the_presets_own_size_match_the_reference_backend(preset, threads, torch_threads):
    """In the model, at a size users run: the preset's vocabulary and width, three left-padded prompts
    (200, 57 and 1 tokens), 20 greedy steps in float64; the torch backend (the C++ path, which also
    writes the cache) gives the reference backend's logits, on one thread and on torch's OpenMP
    threads (every layer's call reads more than the 64 KB from which it hands rows to them)."""
    from engine import GPT, GPTConfig
    from engine.generate import KVCache

    torch_threads(threads)  # the backend hands the extension torch's thread count
    calls = _ext.pool_calls()
    model = GPT(GPTConfig.from_preset(preset), backend="torch").eval().double()
    lengths = [200, 57, 1]
    idx = torch.randint(0, model.config.vocab_size, (3, 200))
    kv_start = torch.tensor([200 - n for n in lengths])
    runs = {}
    with torch.inference_mode():
        for backend in ("torch", "reference"):
            model.set_backend(backend)
            cache = KVCache(model.config, 3, 221, "cpu", torch.float64)
            logits, _ = model(idx, cache=cache, kv_start=kv_start, last_only=True)
            steps = [logits]
            for _ in range(20):
                logits, _ = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache, kv_start=kv_start)
                steps.append(logits)
            runs[backend] = torch.cat(steps, 1)
    assert runs["torch"].shape == (3, 21, model.config.vocab_size)
    assert (runs["torch"] - runs["reference"]).abs().max().item() < 1e-10
    assert _ext.pool_calls() - calls == (20 * model.config.n_layer if threads > 1 else 0)
