"""Inference speed: our KV-cache generation against Hugging Face `generate` on the same weights.

    python benchmarks/generate.py [--toy] [--preset NAME] [--config n_layer=6,...] [--batches 1,8,64]
                                  [--prompt-len P] [--new-tokens N] [--modes greedy,sample]
                                  [--threads 1,0] [--reps R] [--compile] [--name STEM] [--out DIR]

Both sides get the same model (`engine.hf.to_hf` copies our weights into a GPT2LMHeadModel),
the same random prompts (equal lengths, no padding), exactly N new tokens (no stop tokens) and
the same sampling parameters: greedy, and temperature 0.8 / top-k 50 / top-p 0.9 ("sample").
On CUDA both run under bf16 autocast (our default on CUDA; backend "auto" = triton), on the CPU
in float32 (backend "torch"). --threads 1,0 runs every case with one torch thread and then with
torch's default, side by side (the C++ sampler uses as many threads as torch). --compile adds two
rows per case: ours with generate's compile=True ("ours-graph": the draw on the device and each
decode step replayed from a CUDA graph; on the CPU the same static-shape steps run eagerly) and a
gpt-fast-style baseline ("hf-static-compiled": the HF model with a static KV cache and its forward
under torch.compile(mode="reduce-overhead", fullgraph=True), as transformers' own guide sets it up;
its compile is paid in the warm-up repetition). Per batch size,
mode and thread count, medians over R repetitions:
    prefill_ms      one forward over the prompts that fills the KV cache
    ttft_ms         time to first token: prefill + the first sampling step
    decode_tok_s    B·(N-1) / (time for N tokens - time to first token)
    forward_pct     ours only: share of the decode time spent in the model's forward
    sample_pct      ours only: share spent in the sampler (DecodeLoop.step); both measured by
                    decode_steps' phase hook (PhaseTimer, which synchronizes the device at every
                    phase's ends), per repetition; what they leave is Python between the steps
    match           greedy only: fraction of our tokens equal to HF's
    speedup_vs_hf   decode tok/s over HF `generate`'s (the "hf" row)
    pct_of_copy_bw  the least a decode step reads (weights at the compute dtype + KV cache) x
                    steps/s, as a share of roofline.py's measured copy bandwidth
Writes <name>.csv, <name>.md and <name>.png (name: --name, default "generate") into the results folder.
"""
import argparse
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
from engine.config import GPTConfig  # noqa: E402
from engine.devices import autocast_for, kv_cache_dtype  # noqa: E402
from engine.generate import KVCache, PhaseTimer, decode_steps  # noqa: E402
from engine.hf import to_hf  # noqa: E402
from engine.model import GPT  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

MODES = {"greedy": dict(temperature=0.0), "sample": dict(temperature=0.8, top_k=50, top_p=0.9)}
COLUMNS = ("threads", "impl", "mode", "batch", "prompt_len", "new_tokens", "prefill_ms", "ttft_ms", "decode_tok_s", "forward_pct",
           "sample_pct", "match", "speedup_vs_hf", "pct_of_copy_bw")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- ours


@torch.no_grad()
def ours_prefill_ms(model, prompts: torch.Tensor) -> float:
    device = prompts.device
    cache = KVCache(model.config, prompts.shape[0], prompts.shape[1], device, kv_cache_dtype(model))
    sync(device)
    t0 = time.perf_counter()
    with autocast_for(device):
        model(prompts, cache=cache, last_only=True)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def ours_run(model, prompts: list[list[int]], params: SamplingParams, device, compile=False) -> dict:
    """Time to first token, total time, seconds in the forward and in the sampler after the
    first token (decode_steps' phase hook), tokens of one generation."""
    timer = PhaseTimer(sync=torch.cuda.synchronize if device.type == "cuda" else None)
    sync(device)
    t0 = time.perf_counter()
    ttft = None
    for tokens, loop in decode_steps(model, prompts, [params] * len(prompts), phase=timer, compile=compile):
        if ttft is None:
            ttft, at_first_token = time.perf_counter() - t0, timer.seconds.copy()
    sync(device)
    total = time.perf_counter() - t0
    return dict(ttft=ttft, total=total, tokens=loop.generated, forward=timer.seconds["forward"] - at_first_token["forward"],
                sample=timer.seconds["sampling"] - at_first_token["sampling"])


# ----------------------------------------------------------------------------- Hugging Face


@torch.no_grad()
def hf_prefill_ms(hf, prompts: torch.Tensor) -> float:
    device = prompts.device
    # Only the last position's logits, like our prefill and HF's own generate, where transformers supports it.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}
    sync(device)
    t0 = time.perf_counter()
    with autocast_for(device):
        hf(prompts, use_cache=True, **last_only)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def hf_generate(hf, prompts: torch.Tensor, n: int, mode: str, seed: int):
    kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    torch.manual_seed(seed)
    sync(prompts.device)
    t0 = time.perf_counter()
    with autocast_for(prompts.device):
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                          pad_token_id=0, **kw)
    sync(prompts.device)
    return time.perf_counter() - t0, out[:, prompts.shape[1]:]


# ----------------------------------------------------------------------------- the benchmark


def bytes_per_step(model, batch: int, context: float) -> float:
    """The least a decode step must read: every weight once at the compute dtype (the KV cache's:
    bf16 under autocast on CUDA, else the weights') and the KV cache of `context` positions."""
    size = kv_cache_dtype(model).itemsize
    cfg = model.config
    return size * (model.num_params(non_embedding=False) + 2 * cfg.n_layer * batch * context * cfg.n_embd)


def static_compiled(hf, toy=False):
    """The gpt-fast-style HF baseline (transformers' guide to optimizing inference): generate with a
    static KV cache, the forward compiled with mode="reduce-overhead" (CUDA graphs on a GPU). toy:
    compiled with the "eager" backend instead (Dynamo's trace without inductor's minutes of C++
    builds on a CPU): a smoke test of the plumbing, not a figure."""
    hf.generation_config.cache_implementation = "static"
    kw = dict(backend="eager") if toy else dict(mode="reduce-overhead")
    hf.forward = torch.compile(hf.forward, fullgraph=True, **kw)
    return hf


def bench(model, hfs: dict, batch: int, prompt_len: int, n: int, mode: str, reps: int, device, copy_gbps: float,
          compile=False) -> list[dict]:
    """One row per implementation: ours (and ours-graph with compile) and every HF model in hfs
    ({"hf": eager, optionally "hf-static-compiled": ...}); medians of reps after one warm-up."""
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g)
    on_device = prompts.to(device)
    params = SamplingParams(**MODES[mode], seed=0, max_new_tokens=n)
    ours_modes = {"ours": False, **({"ours-graph": True} if compile else {})}
    runs = {impl: [] for impl in (*ours_modes, *hfs)}
    hf_tokens = None
    for rep in range(reps + 1):  # the first repetition warms up (allocator, autotuning, compiles, HF's setup)
        for impl, graph in ours_modes.items():
            run = ours_run(model, prompts.tolist(), params, device, compile=graph)
            run["prefill"] = ours_prefill_ms(model, on_device) / 1e3
            runs[impl].append(run)
        for impl, hf in hfs.items():
            t1, _ = hf_generate(hf, on_device, 1, mode, rep)
            tn, tokens = hf_generate(hf, on_device, n, mode, rep)
            hf_tokens = tokens if impl == "hf" else hf_tokens
            runs[impl].append(dict(ttft=t1, total=tn, prefill=hf_prefill_ms(hf, on_device) / 1e3))
    med = lambda timed, key: statistics.median(r[key] for r in timed)  # noqa: E731
    # each repetition's share of its own decode time, then the median (a median of the forward's
    # seconds over a median of the decode times could pass 100%)
    share = lambda timed, key: statistics.median(100 * r[key] / max(r["total"] - r["ttft"], 1e-9) for r in timed)  # noqa: E731
    rows = []
    for impl, timed in runs.items():
        timed = timed[1:]
        ttft, total = med(timed, "ttft"), med(timed, "total")
        ours = impl in ours_modes
        rows.append(dict(impl=impl, mode=mode, batch=batch, prompt_len=prompt_len, new_tokens=n,
                         prefill_ms=round(med(timed, "prefill") * 1e3, 3), ttft_ms=round(ttft * 1e3, 3),
                         decode_tok_s=round(batch * (n - 1) / max(total - ttft, 1e-9), 1),
                         forward_pct=round(share(timed, "forward"), 1) if ours else None,
                         sample_pct=round(share(timed, "sample"), 1) if ours else None,
                         match=None, speedup_vs_hf=None))
        if ours and mode == "greedy":
            same = torch.tensor(timed[-1]["tokens"]) == hf_tokens.cpu()
            rows[-1]["match"] = round(same.float().mean().item(), 3)
        gbps = bytes_per_step(model, batch, prompt_len + n / 2) * rows[-1]["decode_tok_s"] / batch / 1e9
        # three significant figures: a toy model on the CPU reads a few thousandths of a percent
        rows[-1]["pct_of_copy_bw"] = float(f"{100 * gbps / copy_gbps:.3g}")
    hf_rate = next(r["decode_tok_s"] for r in rows if r["impl"] == "hf")
    for r in rows:
        r["speedup_vs_hf"] = round(r["decode_tok_s"] / hf_rate, 2)
    return rows


def markdown(rows: list[dict], model_name: str, device, backend: str) -> str:
    lines = [
        f"## Generation: {model_name} ({device.type}, ours = backend {backend}), ours vs Hugging Face `generate`",
        "",
        f"Random prompts of {rows[0]['prompt_len']} tokens, {rows[0]['new_tokens']} new tokens, medians. "
        "decode tok/s counts every row of the batch; vs hf: over HF `generate`'s decode tok/s; forward % and sampler % "
        "are the shares of our decode time spent in the model and in the sampler (the rest is Python between steps); "
        "% of copy BW: weights + KV cache read per step x steps/s over the measured copy bandwidth (roofline.csv).",
        "",
        "| threads | mode | batch | impl | prefill ms | TTFT ms | decode tok/s | vs hf | forward % | sampler % "
        "| greedy match | % of copy BW |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    blank = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['threads']} | {r['mode']} | {r['batch']} | {r['impl']} | {r['prefill_ms']:.2f} | {r['ttft_ms']:.2f} | "
                     f"{r['decode_tok_s']:.0f} | {r['speedup_vs_hf']:.2f}x | {blank(r['forward_pct'], '.1f')} | "
                     f"{blank(r['sample_pct'], '.1f')} | {blank(r['match'], '')} | {r['pct_of_copy_bw']:.3g} |")
    return "\n".join(lines) + "\n"


def parse_overrides(text: str) -> dict:
    """"n_layer=6,n_embd=192" -> {"n_layer": 6, "n_embd": 192} (GPTConfig fields, integer values)."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(p) != 2 or not p[1].lstrip("-").isdigit() for p in pairs):
        raise SystemExit(f"--config: expected comma-separated field=integer pairs, got {text!r}")
    return {k: int(v) for k, v in pairs}


TOY = dict(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)  # --toy: "tiny" shrunk to almost nothing


def main(argv=None) -> list[dict]:
    on_gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="a 2-layer, 32-wide model, 8 tokens: a smoke test of the script")
    ap.add_argument("--preset", default="gpt2" if on_gpu else "tiny", help="model size (default gpt2 on CUDA, tiny on the CPU)")
    ap.add_argument("--config", default="", help="preset fields to override, e.g. n_layer=6,n_head=6,n_embd=192")
    ap.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512 on CUDA, 64 on the CPU)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 256 on CUDA, 128 on the CPU)")
    ap.add_argument("--modes", default="greedy,sample", help="comma-separated subset of greedy,sample")
    ap.add_argument("--threads", default="0", help="comma-separated torch thread counts to run each case with, side by side; "
                    "0 = torch's default (default 0)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (default 3)")
    ap.add_argument("--compile", action="store_true", help="add ours with compile=True (CUDA-graph decode) and HF with a "
                    "static cache under torch.compile(mode='reduce-overhead') (gpt-fast style)")
    ap.add_argument("--name", default="generate", help="file name stem of the results (default generate)")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<hardware>-<date>/)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if on_gpu else "cpu")
    reps, overrides = args.reps, parse_overrides(args.config)
    batches = [int(b) for b in args.batches.split(",")]
    prompt_len, n = args.prompt_len or (512 if on_gpu else 64), args.new_tokens or (256 if on_gpu else 128)
    default_threads = torch.get_num_threads()
    threads = [int(t) or default_threads for t in args.threads.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode {m!r}; choose from {','.join(MODES)}")
    if args.toy:
        overrides, batches, prompt_len, n, reps = TOY, [1, 2], 8, 8, 1
    model_name = f"preset {args.preset}" + "".join(f", {k}={v}" for k, v in overrides.items())
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset, **overrides)).to(device).eval()
    hfs = {"hf": to_hf(model), **({"hf-static-compiled": static_compiled(to_hf(model), args.toy)} if args.compile else {})}
    backend = model.ops_for(device).name
    out = results_dir(args.out)
    peak = peaks(out, toy=args.toy)
    rows = []
    for mode in modes:
        for b in batches:
            for t in threads:  # side by side: the machine's load changes less between them
                torch.set_num_threads(t)
                case = bench(model, hfs, b, prompt_len, n, mode, reps, device, peak["copy_gbps"], args.compile)
                rows += [{"threads": t, **r} for r in case]
                for r in rows[-len(case):]:
                    print(", ".join(f"{k}={r[k]}" for k in COLUMNS), flush=True)
            write_csv(rows, out / f"{args.name}.csv")  # after every case: a run stopped by a time cap keeps what it measured
            text = markdown(rows, model_name, device, backend)
            (out / f"{args.name}.md").write_text(text)
    torch.set_num_threads(default_threads)
    if not args.toy:
        plot_lines([{**r, "series": f"{r['impl']} {r['mode']} t{r['threads']}"} for r in rows], "batch", "decode_tok_s", "series",
                   out / f"{args.name}.png", f"decode tokens/s, {model_name}, {device.type}")
    print(text)
    return rows


if __name__ == "__main__":
    main()
