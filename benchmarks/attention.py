"""Attention speed: kernels.flash_attention against torch SDPA (each backend) and torch.compile.

    python benchmarks/attention.py [--toy] [--gqa] [--out DIR]

Forward and forward+backward TFLOP/s over sequence lengths (FLOPs 4·B·H·Sq·Sk·D, halved when
causal; the backward counts 2.5x the forward; "ours-atomic" is the deterministic=False backward;
"ours-plain", on sm_90 only, the forward without its QKᵀ/softmax overlap, kernels.attention.OVERLAP),
and decode-step latency (one query over a KV cache
of Sk keys) at batch 1 and 16. On CUDA: bf16, D in {64, 128}, S from 512 to 16k with B·S = 16k
tokens and H·D = 2048. --toy: a few tiny fp32 shapes for the CPU (the Triton interpreter) that
check the script runs. Writes attention.csv and one PNG per mode into the results folder.
--gqa: grouped-query attention at Llama-3-8B's shape instead (H=32 query heads over Hkv=8 K/V heads,
D=128, causal, bf16; S from 1k to 16k with B·S = 16k tokens, and decode steps), against SDPA with
enable_gqa=True (backends without GQA support drop out); writes attention_gqa.csv and its PNGs.
With --toy: H=4 over Hkv=2, tiny fp32 shapes.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import plot_lines, results_dir, time_ms, write_csv  # noqa: E402
from engine import reference  # noqa: E402
from kernels import attention, flash_attention  # noqa: E402

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def sdpa(backend: str):
    """SDPA pinned to one backend; queries sit at the end of the keys (is_causal needs Sq == Sk)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}[backend]

    def attend(q, k, v, causal):
        with sdpa_kernel(getattr(SDPBackend, which)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[-2] > 1,
                                                  enable_gqa=k.shape[1] != q.shape[1])
    return attend


def plain_forward(q, k, v, causal):
    """Ours with the sm_90 forward's key loop not software-pipelined (kernels.attention.OVERLAP off)."""
    saved, attention.OVERLAP = attention.OVERLAP, False
    try:
        return flash_attention(q, k, v, causal=causal)
    finally:
        attention.OVERLAP = saved


def implementations(toy: bool, gqa: bool = False) -> dict:
    impls = {"ours": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal),
             # backward with atomic dQ (not bitwise deterministic); its forward is "ours"
             "ours-atomic": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, deterministic=False)}
    if attention._target(torch.device("cuda" if torch.cuda.is_available() else "cpu"))[0] >= attention._TMA_ARCH:
        impls["ours-plain"] = plain_forward  # forward only
    impls.update({f"sdpa-{b}": sdpa(b) for b in SDPA_BACKENDS})
    if not toy and not gqa:  # inductor on the CPU would first build C++; on CUDA it emits Triton
        compiled = torch.compile(reference.attention, dynamic=True)
        impls["compiled-reference"] = lambda q, k, v, causal: compiled(q, k, v, causal=causal)
    return impls


def measure(fn, backward: bool, toy: bool):
    """Median ms of one call (with backward), or None when the implementation can't run it."""
    q, k, v = fn.inputs
    do = torch.randn_like(q)

    def step():
        o = fn(q, k, v)
        if backward:
            torch.autograd.grad(o, (q, k, v), do)
    try:
        step()  # compile / warm up; also rejects unsupported shapes and backends
        return time_ms(step, warmup=0, reps=1) if toy else time_ms(step, warmup=2, reps=10)
    except (RuntimeError, torch.OutOfMemoryError) as err:
        print(f"  skipped: {str(err).splitlines()[0][:100]}", file=sys.stderr)
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def bench_training(keep, impls, seqlens, head_dims, dtype, device, toy: bool, heads: int | None = None, group: int = 1,
                   causal_modes=(True, False)):
    """keep(row) takes each measurement. heads: query heads (default H·D = 2048, 64 in toy mode);
    group: query heads per K/V head."""
    tokens = 4 * max(seqlens) if toy else 16384
    width = 64 if toy else 2048
    for d in head_dims:
        h = heads or width // d
        hkv = h // group
        for s in seqlens:
            b = max(1, tokens // s)
            for causal in causal_modes:
                for backward in (False, True):
                    flops = 4 * b * h * s * s * d / (2 if causal else 1) * (3.5 if backward else 1.0)
                    for name, attend in impls.items():
                        if name in ("sdpa-math", "compiled-reference") and s > 4096:
                            continue  # materialises the S x S scores: minutes and tens of GB
                        if (name == "ours-atomic" and not backward) or (name == "ours-plain" and backward):
                            continue
                        q, k, v = (torch.randn(b, n, s, d, device=device, dtype=dtype, requires_grad=True)
                                   for n in (h, hkv, hkv))

                        def fn(q_, k_, v_, attend=attend, causal=causal):
                            return attend(q_, k_, v_, causal)
                        fn.inputs = (q, k, v)
                        ms = measure(fn, backward, toy)
                        tflops = None if ms is None else flops / ms / 1e9
                        mode = "fwd+bwd" if backward else "fwd"
                        keep({"mode": mode, "impl": name, "batch": b, "heads": h, "kv_heads": hkv, "seqlen": s,
                              "cache": "", "head_dim": d, "causal": causal, "dtype": str(dtype).replace("torch.", ""),
                              "ms": ms, "tflops": tflops})
                        print(f"{mode:8s} H={h}/{hkv} D={d:3d} S={s:6d} causal={causal!s:5s} {name:20s} "
                              f"{'-' if ms is None else f'{ms:9.3f} ms {tflops:7.1f} TFLOP/s'}")


def bench_decode(keep, impls, caches, batches, dtype, device, toy: bool, heads: int | None = None, group: int = 1):
    """One new query per sequence against a cache of Sk keys (the generation step); keep(row) takes each."""
    h, d = (2, 32) if toy else (16, 128)
    h = heads or h
    hkv = h // group
    for b in batches:
        for sk in caches:
            for name, attend in impls.items():
                if name in ("compiled-reference", "ours-atomic", "ours-plain"):
                    continue
                q = torch.randn(b, h, 1, d, device=device, dtype=dtype)
                k, v = (torch.randn(b, hkv, sk, d, device=device, dtype=dtype) for _ in range(2))

                def fn(q_, k_, v_, attend=attend):
                    return attend(q_, k_, v_, True)
                fn.inputs = (q, k, v)
                with torch.no_grad():
                    ms = measure(fn, False, toy)
                keep({"mode": "decode", "impl": name, "batch": b, "heads": h, "kv_heads": hkv, "seqlen": 1, "cache": sk,
                      "head_dim": d, "causal": True, "dtype": str(dtype).replace("torch.", ""), "ms": ms,
                      "tflops": None if ms is None else 4 * b * h * sk * d / ms / 1e9})
                print(f"decode   B={b:3d} H={h}/{hkv} cache={sk:6d} {name:20s} {'-' if ms is None else f'{ms * 1e3:9.1f} us'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="tiny fp32 shapes: a CPU smoke run")
    parser.add_argument("--gqa", action="store_true",
                        help="grouped-query attention at Llama-3-8B's shape (H=32, Hkv=8, D=128) instead")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<hw>-<date>)")
    args = parser.parse_args(argv)
    on_cuda = torch.cuda.is_available()
    if not (on_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        parser.error("needs a CUDA GPU, or TRITON_INTERPRET=1 with --toy")
    toy = args.toy or not on_cuda
    device, dtype = ("cuda", torch.bfloat16) if on_cuda and not toy else (("cuda" if on_cuda else "cpu"), torch.float32)
    impls = implementations(toy, args.gqa)
    out = results_dir(args.out)
    name = "attention_gqa" if args.gqa else "attention"
    rows = []

    def keep(row):  # the CSV after every measurement: a run stopped by its time cap keeps what it measured
        rows.append(row)
        write_csv(rows, out / f"{name}.csv")

    if args.gqa and toy:
        gqa = dict(heads=4, group=2)
        bench_training(keep, impls, (32, 64), (32,), dtype, device, toy, causal_modes=(True,), **gqa)
        bench_decode(keep, impls, (128, 256), (1,), dtype, device, toy, **gqa)
    elif args.gqa:  # Llama-3-8B: 32 query heads over 8 K/V heads of 128
        gqa = dict(heads=32, group=4)
        bench_training(keep, impls, (1024, 2048, 4096, 8192, 16384), (128,), dtype, device, toy, causal_modes=(True,), **gqa)
        bench_decode(keep, impls, (1024, 4096, 16384), (1, 16), dtype, device, toy, **gqa)
    elif toy:
        bench_training(keep, impls, (32, 64), (32,), dtype, device, toy)
        bench_decode(keep, impls, (128, 256), (1, 2), dtype, device, toy)
    else:
        bench_training(keep, impls, (512, 1024, 2048, 4096, 8192, 16384), (64, 128), dtype, device, toy)
        bench_decode(keep, impls, (1024, 2048, 4096, 8192, 16384, 32768), (1, 16), dtype, device, toy)
    for mode in ("fwd", "fwd+bwd"):
        sub = [{**r, "case": f"H={r['heads']}/{r['kv_heads']} D={r['head_dim']} {'causal' if r['causal'] else 'full'}"}
               for r in rows if r["mode"] == mode]
        plot_lines(sub, "seqlen", "tflops", "impl", out / f"{name}_{mode.replace('+', '_')}.png",
                   f"{name} {mode} TFLOP/s ({sub[0]['dtype']})", facet="case")
    plot_lines([r for r in rows if r["mode"] == "decode"], "cache", "ms", "impl", out / f"{name}_decode.png",
               f"{name} decode step latency (ms)", facet="batch")
    print(f"wrote {out / f'{name}.csv'}")
    summarize(rows)


def summarize(rows):
    """Ours against the best SDPA backend, per case (the targets in the issue)."""
    def best(pred):
        vals = [r["ms"] for r in rows if pred(r) and r["impl"].startswith("sdpa") and r["ms"] is not None]
        return min(vals) if vals else None
    for r in rows:
        if not r["impl"].startswith("ours") or r["ms"] is None:
            continue
        key = ("mode", "batch", "heads", "kv_heads", "seqlen", "cache", "head_dim", "causal")
        ref = best(lambda x: all(x[c] == r[c] for c in key))
        if ref is not None:
            print(f"{r['impl']:11s} {r['mode']:8s} H={r['heads']}/{r['kv_heads']} D={r['head_dim']} S={r['seqlen']} cache={r['cache'] or '-'} B={r['batch']} "
                  f"causal={r['causal']}: {ref / r['ms']:.2f}x the best SDPA backend")


if __name__ == "__main__":
    main()
