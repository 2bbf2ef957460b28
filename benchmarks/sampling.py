"""Time per decode step of the samplers on the CPU: C++, the PyTorch reference, Hugging Face.

Every implementation does the same work on the same [B, V] float32 logits: repetition penalty
1.1 over 512 previous tokens per row, temperature 0.8, top-k 50, top-p 0.9, then one draw.
    cpp        engine.sampling.Sampler("cpp").sample: stateless, recounts the 512 tokens each call
    cpp_loop   engine.sampling.DecodeLoop(impl="cpp").step: the decode loop's path, counts kept
    reference  engine.sampling.Sampler("reference").sample
    hf         transformers' LogitsProcessorList(RepetitionPenalty, Temperature, TopK, TopP)
               + softmax + torch.multinomial
Default thread settings for all (torch's intra-op pool; the C++ sampler uses as many threads);
--threads N sets both to N (files get a _tN suffix). On a machine busy with other work, torch's
multi-threaded ops slow down far more than the C++ sampler: compare with a --threads 1 run.

    python benchmarks/sampling.py [--toy] [--threads N] [--out DIR]   # CSV + markdown table (+ plot)
    pytest benchmarks/sampling.py                       # the same cases under pytest-benchmark

--pool measures where handing the C++ sampler's rows to torch's OpenMP threads starts to pay:
DecodeLoop.step on one thread against those threads forced on (engine._sampler.set_pool_min_work(0))
with --threads (default 2) threads, for greedy and for top-k/top-p rows over a grid of V and B, side by side. The
sampler's threshold (engine._sampler.pool_min_work(), in logits read, sampled rows x8) sits where
the gain outgrows the hand-off. Writes sampling_pool.csv and .md.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import plot_lines, results_dir, time_ms, write_csv
from engine import _sampler
from engine.sampling import DecodeLoop, Sampler, SamplingParams

SETTINGS = dict(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1)
N_PREV = 512
VOCABS, BATCHES = (32000, 50257, 128256), (1, 8, 64)
IMPLS = ("cpp", "cpp_loop", "reference", "hf")


def make_step(impl: str, B: int, V: int):
    """A no-argument function doing one sampling step of `impl` on fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=g) * 3
    prev = torch.randint(0, V, (B, N_PREV), generator=g)
    if impl == "hf":
        from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                                  TopPLogitsWarper)

        chain = LogitsProcessorList([
            RepetitionPenaltyLogitsProcessor(SETTINGS["repetition_penalty"]), TemperatureLogitsWarper(SETTINGS["temperature"]),
            TopKLogitsWarper(SETTINGS["top_k"]), TopPLogitsWarper(SETTINGS["top_p"]),
        ])
        return lambda: torch.multinomial(torch.softmax(chain(prev, logits), dim=-1), 1)
    prev_lists = prev.tolist()
    if impl == "cpp_loop":
        loop = DecodeLoop([SamplingParams(**SETTINGS, seed=b, max_new_tokens=10**9) for b in range(B)], prev_lists, impl="cpp")
        return lambda: loop.step(logits)
    sampler = Sampler(impl)
    params = [SamplingParams(**SETTINGS, seed=b) for b in range(B)]
    positions = [N_PREV] * B
    return lambda: sampler.sample(logits, params, prev_lists, positions)


def repetitions(fn, budget_s: float) -> int:
    """How many timed calls fit the budget (3 to 50), from one untimed call."""
    t0 = time.perf_counter()
    fn()
    return max(3, min(50, int(budget_s / max(time.perf_counter() - t0, 1e-6))))


def run(vocabs, batches, budget_s: float) -> list[dict]:
    rows = []
    for V in vocabs:
        for B in batches:
            ms = {}
            for impl in IMPLS:
                fn = make_step(impl, B, V)
                ms[impl] = time_ms(fn, warmup=1, reps=repetitions(fn, budget_s))
            for impl in IMPLS:
                rows.append(dict(impl=impl, V=V, B=B, ms_per_step=round(ms[impl], 4), speedup_vs_hf=round(ms["hf"] / ms[impl], 2)))
            print(f"V={V:6d} B={B:2d}  " + "  ".join(f"{i} {ms[i]:8.3f} ms" for i in IMPLS), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["V", "B"] + [f"{i} ms" for i in IMPLS] + ["cpp vs hf", "cpp_loop vs hf"]
    lines = [
        "# Sampler time per decode step (CPU, median)",
        "",
        f"temperature {SETTINGS['temperature']}, top_k {SETTINGS['top_k']}, top_p {SETTINGS['top_p']}, repetition_penalty "
        f"{SETTINGS['repetition_penalty']}, {N_PREV} previous tokens per row; torch threads {torch.get_num_threads()}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} when the table was written (other work on the machine "
        "slows the multi-threaded torch ops most).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for V, B in dict.fromkeys((r["V"], r["B"]) for r in rows):
        cell = {r["impl"]: r for r in rows if r["V"] == V and r["B"] == B}
        lines.append("| " + " | ".join([str(V), str(B)] + [f"{cell[i]['ms_per_step']:.3f}" for i in IMPLS]
                                       + [f"{cell['cpp']['speedup_vs_hf']:.1f}x", f"{cell['cpp_loop']['speedup_vs_hf']:.1f}x"]) + " |")
    return "\n".join(lines) + "\n"


POOL_KINDS = {"greedy": dict(temperature=0.0), "sample": dict(temperature=0.8, top_k=50, top_p=0.9)}


def pool_crossover(vocabs, batches, threads: int, budget_s: float) -> list[dict]:
    """us per DecodeLoop.step on one thread and on `threads` with the pool forced on, interleaved."""
    default_min_work, default_threads = _sampler.pool_min_work(), torch.get_num_threads()
    rows = []
    try:
        for kind, settings in POOL_KINDS.items():
            for V in vocabs:
                for B in batches:
                    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 3
                    steps = {}
                    for n, min_work in ((1, default_min_work), (threads, 0)):
                        torch.set_num_threads(n)  # DecodeLoop gives the C++ sampler torch's thread count
                        loop = DecodeLoop([SamplingParams(**settings, seed=b, max_new_tokens=10**9) for b in range(B)], [[0]] * B)
                        steps[n, min_work] = lambda loop=loop, min_work=min_work: (_sampler.set_pool_min_work(min_work), loop.step(logits))
                    us = {key: [] for key in steps}
                    for _ in range(repetitions(next(iter(steps.values())), budget_s)):
                        for key, fn in steps.items():
                            t0 = time.perf_counter()
                            fn()
                            us[key].append((time.perf_counter() - t0) * 1e6)
                    one, pool = (statistics.median(v) for v in us.values())
                    work = B * V * (1 if kind == "greedy" else 8)
                    rows.append(dict(kind=kind, V=V, B=B, work=work, us_one_thread=round(one, 1), us_pool=round(pool, 1),
                                     speedup=round(one / pool, 2)))
                    print(", ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    finally:
        _sampler.set_pool_min_work(default_min_work)
        torch.set_num_threads(default_threads)
    return rows


def pool_markdown(rows: list[dict], threads: int) -> str:
    lines = [
        f"# C++ sampler: one thread vs torch's OpenMP threads ({threads}), us per DecodeLoop.step (median)",
        "",
        f"greedy = temperature 0 (one argmax pass); sample = {POOL_KINDS['sample']}. work = B x V, x8 for sampled rows; "
        f"the sampler uses the pool from work >= {_sampler.pool_min_work()}. {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} when the table was written.",
        "",
        "| kind | V | B | work | us one thread | us pool | pool speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['V']} | {r['B']} | {r['work']} | {r['us_one_thread']} | {r['us_pool']} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="tiny sizes: a smoke test of the script")
    ap.add_argument("--threads", type=int, default=None, help="torch and C++ sampler threads (default: torch's default)")
    ap.add_argument("--pool", action="store_true", help="measure where handing sampler rows to torch's OpenMP threads pays instead (see above)")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<hardware>-<date>/)")
    args = ap.parse_args(argv)
    if args.pool:
        threads = args.threads or 2
        vocabs, batches, budget = ((1000,), (1, 8), 0.02) if args.toy else ((2048, 4096, 32000, 128256), (1, 8, 64), 1.0)
        rows = pool_crossover(vocabs, batches, threads, budget)
        out = results_dir(args.out)
        write_csv(rows, out / "sampling_pool.csv")
        (out / "sampling_pool.md").write_text(pool_markdown(rows, threads))
        print(f"wrote {out / 'sampling_pool'}.csv and .md")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    vocabs, batches, budget = ((1000,), (1, 4), 0.02) if args.toy else (VOCABS, BATCHES, 1.5)
    rows = run(vocabs, batches, budget)
    out = results_dir(args.out)
    name = f"sampling_t{args.threads}" if args.threads else "sampling"
    write_csv(rows, out / f"{name}.csv")
    (out / f"{name}.md").write_text(markdown(rows))
    if not args.toy:
        plot_lines(rows, "B", "speedup_vs_hf", "impl", out / f"{name}.png",
                   f"sampler speed-up over the HF chain (CPU, {torch.get_num_threads()} threads)", facet="V")
    print(f"wrote {out / name}.csv and .md")


# ----------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # the script does not need pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("B", BATCHES)
    @pytest.mark.parametrize("V", VOCABS)
    def test_sampling_step(benchmark, impl, V, B):
        fn = make_step(impl, B, V)
        benchmark.pedantic(fn, rounds=repetitions(fn, 1.0), warmup_rounds=1)


if __name__ == "__main__":
    main()
