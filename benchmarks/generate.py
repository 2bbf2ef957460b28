"""Inference speed: our KV-cache generation against Hugging Face `generate` on the same weights.

    python benchmarks/generate.py [--toy] [--preset NAME] [--batches 1,8,64] [--prompt-len P]
                                  [--new-tokens N] [--modes greedy,sample] [--reps R] [--out DIR]

Both sides get the same model (`engine.hf.to_hf` copies our weights into a GPT2LMHeadModel),
the same random prompts (equal lengths, no padding), exactly N new tokens (no stop tokens) and
the same sampling parameters: greedy, and temperature 0.8 / top-k 50 / top-p 0.9 ("sample").
On CUDA both run under bf16 autocast (our default on CUDA; backend "auto" = triton), on the CPU
in float32 (backend "torch"). Per batch size and mode, medians over R repetitions:
    prefill_ms      one forward over the prompts that fills the KV cache
    ttft_ms         time to first token: prefill + the first sampling step
    decode_tok_s    B·(N-1) / (time for N tokens - time to first token)
    sample_pct      ours only: share of a decode step spent in the sampler (DecodeLoop.step,
                    measured after a device synchronize so it does not absorb the forward)
    match           greedy only: fraction of our tokens equal to HF's
    pct_of_copy_bw  the least a decode step reads (weights at the compute dtype + KV cache) x
                    steps/s, as a share of roofline.py's measured copy bandwidth
Writes generate.csv, generate.md and generate.png into the results folder.
"""
import argparse
import contextlib
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import plot_lines, results_dir, write_csv  # noqa: E402
from benchmarks.roofline import peaks  # noqa: E402
from engine.config import PRESETS, GPTConfig  # noqa: E402
from engine.generate import KVCache, decode_steps  # noqa: E402
from engine.hf import to_hf  # noqa: E402
from engine.model import GPT  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

MODES = {"greedy": dict(temperature=0.0), "sample": dict(temperature=0.8, top_k=50, top_p=0.9)}
COLUMNS = ("impl", "mode", "batch", "prompt_len", "new_tokens", "prefill_ms", "ttft_ms", "decode_tok_s", "sample_pct",
           "match", "speedup_vs_hf", "pct_of_copy_bw")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------- ours


@torch.no_grad()
def ours_prefill_ms(model, prompts: torch.Tensor) -> float:
    device = prompts.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as engine.generate's cache
    cache = KVCache(model.config, prompts.shape[0], prompts.shape[1], device, dtype)
    sync(device)
    t0 = time.perf_counter()
    with autocast(device):
        model(prompts, cache=cache, last_only=True)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def ours_run(model, prompts: list[list[int]], params: SamplingParams, device) -> dict:
    """Time to first token, total time, time inside the sampler, tokens of one generation."""
    sample_s = [0.0]
    sync(device)
    t0 = time.perf_counter()
    ttft = None
    for tokens, loop in decode_steps(model, prompts, [params] * len(prompts)):
        if ttft is None:
            ttft = time.perf_counter() - t0
            step = loop.step

            def timed_step(logits, step=step):  # the decode loop looks loop.step up on every call
                sync(device)
                s0 = time.perf_counter()
                out = step(logits)
                sample_s[0] += time.perf_counter() - s0
                return out
            loop.step = timed_step
    sync(device)
    total = time.perf_counter() - t0
    return dict(ttft=ttft, total=total, sample=sample_s[0], tokens=loop.generated)


# ----------------------------------------------------------------------------- Hugging Face


@torch.no_grad()
def hf_prefill_ms(hf, prompts: torch.Tensor) -> float:
    device = prompts.device
    # Only the last position's logits, like our prefill and HF's own generate, where transformers supports it.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}
    sync(device)
    t0 = time.perf_counter()
    with autocast(device):
        hf(prompts, use_cache=True, **last_only)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def hf_generate(hf, prompts: torch.Tensor, n: int, mode: str, seed: int):
    kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    torch.manual_seed(seed)
    sync(prompts.device)
    t0 = time.perf_counter()
    with autocast(prompts.device):
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                          pad_token_id=0, **kw)
    sync(prompts.device)
    return time.perf_counter() - t0, out[:, prompts.shape[1]:]


# ----------------------------------------------------------------------------- the benchmark


def bytes_per_step(model, batch: int, context: float, device) -> float:
    """The least a decode step must read: every weight once at the compute dtype (bf16 under
    autocast on CUDA, float32 on the CPU) and the KV cache of `context` positions."""
    size = 2 if device.type == "cuda" else 4
    cfg = model.config
    return size * (model.num_params(non_embedding=False) + 2 * cfg.n_layer * batch * context * cfg.n_embd)


def bench(model, hf, batch: int, prompt_len: int, n: int, mode: str, reps: int, device, copy_gbps: float) -> list[dict]:
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g)
    on_device = prompts.to(device)
    params = SamplingParams(**MODES[mode], seed=0, max_new_tokens=n)
    ours, theirs = [], []
    for rep in range(reps + 1):  # the first repetition warms up (allocator, autotuning, HF's setup)
        run = ours_run(model, prompts.tolist(), params, device)
        run["prefill"] = ours_prefill_ms(model, on_device) / 1e3
        t1, _ = hf_generate(hf, on_device, 1, mode, rep)
        tn, hf_tokens = hf_generate(hf, on_device, n, mode, rep)
        if rep:
            ours.append(run)
            theirs.append(dict(ttft=t1, total=tn, prefill=hf_prefill_ms(hf, on_device) / 1e3))
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    rows = []
    for impl, runs in (("ours", ours), ("hf", theirs)):
        ttft, total = med(runs, "ttft"), med(runs, "total")
        rows.append(dict(impl=impl, mode=mode, batch=batch, prompt_len=prompt_len, new_tokens=n,
                         prefill_ms=round(med(runs, "prefill") * 1e3, 3), ttft_ms=round(ttft * 1e3, 3),
                         decode_tok_s=round(batch * (n - 1) / max(total - ttft, 1e-9), 1),
                         sample_pct=round(100 * med(runs, "sample") / max(total - ttft, 1e-9), 1) if impl == "ours" else None,
                         match=None, speedup_vs_hf=None))
        gbps = bytes_per_step(model, batch, prompt_len + n / 2, device) * rows[-1]["decode_tok_s"] / batch / 1e9
        rows[-1]["pct_of_copy_bw"] = round(100 * gbps / copy_gbps, 2)
    if mode == "greedy":
        same = torch.tensor(ours[-1]["tokens"]) == hf_tokens.cpu()
        rows[0]["match"] = round(same.float().mean().item(), 3)
    rows[0]["speedup_vs_hf"] = round(rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"], 2)
    rows[1]["speedup_vs_hf"] = 1.0
    return rows


def markdown(rows: list[dict], preset: str, device, backend: str) -> str:
    lines = [
        f"## Generation: preset {preset} ({device.type}, ours = backend {backend}), ours vs Hugging Face `generate`",
        "",
        f"Random prompts of {rows[0]['prompt_len']} tokens, {rows[0]['new_tokens']} new tokens, medians. "
        "decode tok/s counts every row of the batch; sampler % is the share of our decode time spent in DecodeLoop.step; "
        "% of copy BW: weights + KV cache read per step x steps/s over the measured copy bandwidth (roofline.csv).",
        "",
        "| mode | batch | prefill ms ours / hf | TTFT ms ours / hf | decode tok/s ours | decode tok/s hf | ours vs hf | sampler % "
        "| greedy match | % of copy BW ours / hf |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i in range(0, len(rows), 2):
        o, h = rows[i], rows[i + 1]
        lines.append(f"| {o['mode']} | {o['batch']} | {o['prefill_ms']:.2f} / {h['prefill_ms']:.2f} | "
                     f"{o['ttft_ms']:.2f} / {h['ttft_ms']:.2f} | "
                     f"{o['decode_tok_s']:.0f} | {h['decode_tok_s']:.0f} | {o['speedup_vs_hf']:.2f}x | {o['sample_pct']:.1f} | "
                     f"{'' if o['match'] is None else o['match']} | {o['pct_of_copy_bw']:.1f} / {h['pct_of_copy_bw']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    on_gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="a 2-layer, 32-wide model, 8 tokens: a smoke test of the script")
    ap.add_argument("--preset", default="gpt2" if on_gpu else "tiny", help="model size (default gpt2 on CUDA, tiny on the CPU)")
    ap.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512 on CUDA, 64 on the CPU)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 256 on CUDA, 128 on the CPU)")
    ap.add_argument("--modes", default="greedy,sample", help="comma-separated subset of greedy,sample")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (default 3)")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<hardware>-<date>/)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if on_gpu else "cpu")
    preset, reps = args.preset, args.reps
    batches = [int(b) for b in args.batches.split(",")]
    prompt_len, n = args.prompt_len or (512 if on_gpu else 64), args.new_tokens or (256 if on_gpu else 128)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode {m!r}; choose from {','.join(MODES)}")
    if args.toy:
        PRESETS["toy"] = dict(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)
        preset, batches, prompt_len, n, reps = "toy", [1, 2], 8, 8, 1
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset)).to(device).eval()
    hf = to_hf(model)
    backend = model.ops_for(device).name
    out = results_dir(args.out)
    peak = peaks(out, toy=args.toy)
    rows = []
    for mode in modes:
        for b in batches:
            rows += bench(model, hf, b, prompt_len, n, mode, reps, device, peak["copy_gbps"])
            print(", ".join(f"{k}={rows[-2][k]}" for k in COLUMNS), flush=True)
            print(", ".join(f"{k}={rows[-1][k]}" for k in COLUMNS), flush=True)
            write_csv(rows, out / "generate.csv")  # after every case: a run stopped by a time cap keeps what it measured
            text = markdown(rows, preset, device, backend)
            (out / "generate.md").write_text(text)
    if not args.toy:
        plot_lines([{**r, "series": f"{r['impl']} {r['mode']}"} for r in rows], "batch", "decode_tok_s", "series",
                   out / "generate.png", f"decode tokens/s, {preset}, {device.type}")
    print(text)
    return rows


if __name__ == "__main__":
    main()
