"""`make bench`: the CPU benchmarks in one call, results in one folder.

    python benchmarks/cpu_suite.py [--threads N] [--out DIR]

Runs, each as its own process with a time cap: roofline.py (the CPU's copy and float32 matmul
ceilings), sampling.py (C++ sampler vs reference vs Hugging Face's processors), train.py on
"tiny" (backends reference, torch, torch.compile; the Triton interpreter takes minutes per step,
so it is left to the GPU suite) and generate.py (ours vs Hugging Face `generate`) on "tiny" and
on a 6-layer, 192-wide model (6 heads, vocabulary 4096, context 512; prompt 40, 96 new tokens),
each case with one torch thread and with torch's default side by side. The caps add up to
19 minutes.
Writes benchmarks/results/<cpu>-<date>/ (or --out): each script's CSV / PNG / markdown, its log,
and summary.md, which is printed last. --threads N sets OMP_NUM_THREADS for every script (torch's
intra-op pool and the C++ sampler): on a machine shared with other work, 1 gives steadier numbers.
"""
import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import results_dir, write_summary  # noqa: E402

# (name, script arguments, time cap in seconds)
STEPS = [
    ("roofline", ["benchmarks/roofline.py"], 30),
    ("sampling", ["benchmarks/sampling.py"], 120),
    ("train", ["benchmarks/train.py", "--backends", "reference,torch,torch.compile"], 270),
    ("generate", ["benchmarks/generate.py", "--threads", "1,0", "--reps", "2"], 300),
    ("generate_6x192", ["benchmarks/generate.py", "--config", "n_layer=6,n_head=6,n_embd=192,vocab_size=4096,block_size=512",
                        "--prompt-len", "40", "--new-tokens", "96", "--threads", "1,0", "--reps", "2", "--name", "generate_6x192"], 420),
]


def run_step(name: str, args: list[str], cap: int, out: Path, env: dict) -> str:
    """Run one script with its output in out/<name>.log; returns 'ok (Ns)' or why not."""
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run([sys.executable, *args, "--out", str(out)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, timeout=cap).returncode
        except subprocess.TimeoutExpired:
            return f"timed out after {cap} s"
    status = "ok" if rc == 0 else f"failed (exit {rc}, see {name}.log)"
    return f"{status}, {time.perf_counter() - t0:.0f} s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every script (default: unset)")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<hardware>-<date>/)")
    args = ap.parse_args(argv)
    out = results_dir(args.out)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    statuses = []
    for name, script, cap in STEPS:
        print(f"[{name}] running (cap {cap} s) ...", flush=True)
        statuses.append(f"{name}: {run_step(name, script, cap, out, env)}")
        print(f"[{statuses[-1]}]", flush=True)

    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    notes = [
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit or 'unknown'}, "
        f"`python benchmarks/cpu_suite.py{f' --threads {args.threads}' if args.threads else ''}`",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, threads {args.threads or 'default'}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"load average {os.getloadavg()[0]:.1f} at the end: other work on the machine makes these timings noisy",
        *statuses,
    ]
    summary = write_summary(out, "CPU benchmark suite", notes, ["roofline", "train", "generate", "generate_6x192", "sampling"])
    print(summary.read_text())
    print(f"wrote {summary}")


if __name__ == "__main__":
    main()
