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
"""
import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import plot_lines, results_dir, time_ms, write_csv
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="tiny sizes: a smoke test of the script")
    ap.add_argument("--threads", type=int, default=None, help="torch and C++ sampler threads (default: torch's default)")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<hardware>-<date>/)")
    args = ap.parse_args(argv)
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
