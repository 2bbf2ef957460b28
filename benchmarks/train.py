"""Training throughput per backend: tokens/s, MFU and peak memory of full optimizer steps.

    python benchmarks/train.py [--toy] [--preset NAME] [--batch-size B] [--seq-len T]
                               [--backends reference,torch,triton,hf,torch.compile] [--steps N] [--name STEM] [--out DIR]
                               [--return-logits]

One step = forward + loss, backward, fused AdamW step (what `llm-engine pretrain` does, without
data loading or clipping), on random tokens. The loss is the backend's fused linear + cross-entropy
(model(..., return_logits=False), as the training loop calls it); --return-logits measures the
path that makes the whole [B, T, V] logits first, then GPT.loss. On CUDA: preset "gpt2" (124M) at context 1024 in
bf16 autocast over fp32 weights, like the training loop. On the CPU: preset "tiny" in float32;
the "triton" backend there runs under TRITON_INTERPRET=1 (a correctness path: its figure is the
interpreter's, not a kernel's).
    torch.compile   the "torch" backend's model wrapped in torch.compile (compiled before timing)
    hf              Hugging Face's model of the same weights (engine.hf.to_hf; SDPA attention), its
                    logits through the same loss: what a user of transformers would train instead
Every backend starts from the same weights and tokens, so its first step's loss (first_loss) must
agree with the others' to rounding.
MFU = model FLOPs per token (6·params + 12·layers·width·T attention FLOPs, GPT.flops_per_token)
x tokens/s over the measured matmul peak of roofline.py (bf16 on CUDA). Peak memory: CUDA's
max_memory_allocated on a GPU; on Linux CPUs the rise of the process's resident high-water mark
(reset through /proc/self/clear_refs). Either counts weights, gradients, optimizer state and
activations of the backend's model, built and trained after the reset.
Writes train.csv, train.md and train.png (or --name's stem) into the results folder.
"""
import argparse
import contextlib
import ctypes
import gc
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the CPU "triton" path

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import plot_bars, results_dir, write_csv  # noqa: E402
from benchmarks.roofline import peaks  # noqa: E402
from engine.config import GPTConfig  # noqa: E402
from engine.devices import autocast_for  # noqa: E402
from engine.model import GPT  # noqa: E402
from engine.train import TrainConfig, make_optimizer  # noqa: E402

BACKENDS = ("reference", "torch", "triton", "hf", "torch.compile")  # compile last: a time cap then costs the least
COLUMNS = ("preset", "backend", "device", "dtype", "batch", "seq_len", "params", "ms_per_step", "tokens_per_s",
           "mfu_pct", "peak_mem_mb", "speedup_vs_torch", "first_loss")


class PeakMemory:
    """Peak memory (MB) of the code run between reset() and read(), or None where unknown."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.proc = Path("/proc/self/status").is_file() and Path("/proc/self/clear_refs").is_file()

    def _rss_kb(self, field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def reset(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        elif self.proc:
            # Hand freed heap pages back to the OS first, or the next backend reuses them unseen.
            with contextlib.suppress(OSError, AttributeError):  # glibc only
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current RSS
            self.base = self._rss_kb("VmRSS") * 1024

    def read(self) -> float | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20  # everything: weights, grads, optimizer, activations
        if self.proc:
            return (self._rss_kb("VmHWM") * 1024 - self.base) / 2**20  # the rise over the resident set at reset()
        return None


def make_step(config: GPTConfig, backend: str, device: torch.device, batch: int, seq_len: int,
              return_logits: bool = False):
    """(step function, model) for one backend; the step runs one full optimizer step and returns
    its loss. The model returned is ours (its parameter and FLOP counts), also for "hf".
    return_logits: the loss from the whole logits (GPT.loss) instead of the fused one."""
    torch.manual_seed(0)  # the same weights for every backend
    model = GPT(config, backend="torch" if backend in ("torch.compile", "hf") else backend)
    model.to(device).train()
    forward = torch.compile(model) if backend == "torch.compile" else model
    trained = model
    if backend == "hf":
        from engine.hf import to_hf

        trained = to_hf(model).train()
        trained.set_attn_implementation("sdpa")
        forward = lambda idx, targets, **_: (None, GPT.loss(trained(idx).logits, targets))  # noqa: E731
    optimizer = make_optimizer(trained, TrainConfig(max_steps=1))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    inputs, targets = x[:, :-1], x[:, 1:]
    autocast = autocast_for(device)

    def step():
        with autocast:
            _, loss = forward(inputs, targets, return_logits=return_logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_backend(preset, config, backend, device, batch, seq_len, steps, warmup, budget_s, peak_tflops,
                  return_logits=False) -> dict:
    mem = PeakMemory(device)
    mem.reset()
    step, model = make_step(config, backend, device, batch, seq_len, return_logits)
    for i in range(warmup):  # compile, autotune, allocator warm-up
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        if i == 0:
            first_loss = loss.item()
    last = time.perf_counter() - t0  # the last warm-up step: a step's cost once compiled
    n = min(steps, max(3, int(budget_s / max(last, 1e-6))))  # the slow backends get fewer timed steps (3 at least)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    ms = sorted(times)[len(times) // 2] * 1e3
    tokens_per_s = batch * seq_len / (ms / 1e3)
    flops = model.flops_per_token(seq_len) * tokens_per_s
    peak_mb = mem.read()
    row = dict(preset=preset, backend=backend, device=str(device), dtype="bf16-autocast" if device.type == "cuda" else "float32",
               batch=batch, seq_len=seq_len, params=model.num_params(), ms_per_step=round(ms, 3),
               tokens_per_s=round(tokens_per_s, 1), mfu_pct=round(100 * flops / (peak_tflops * 1e12), 2),
               peak_mem_mb=None if peak_mb is None else round(peak_mb, 1), speedup_vs_torch=None,
               first_loss=round(first_loss, 6))
    del step, model
    return row


def markdown(rows: list[dict], peak: dict, timed: str, note: str = "") -> str:
    r0 = rows[0]
    lines = [
        f"## Training: preset {r0['preset']}, batch {r0['batch']} x context {r0['seq_len']}, {r0['dtype']}, {r0['device']}",
        "",
        f"Median of {timed} full optimizer steps (forward, backward, AdamW) on random tokens. MFU over the measured "
        f"{peak['matmul_dtype']} matmul peak of {peak['matmul_tflops']} TFLOP/s (roofline.csv). {note}",
        "",
        "| backend | ms/step | tokens/s | MFU | peak memory MB | vs torch | first step's loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["ms_per_step"] is None:
            lines.append(f"| {r['backend']} | failed: {r['error']} | | | | | |")
            continue
        vs = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else ""
        mem = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"| {r['backend']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.0f} | {r['mfu_pct']:.1f}% | {mem} | {vs} "
                     f"| {r['first_loss']:.6f} |")
    return "\n".join(lines) + "\n"


def save(rows: list[dict], out: Path, peak: dict, steps: int, note: str, name: str = "train") -> tuple[list[dict], str]:
    """NAME.csv and NAME.md of the rows so far (after every backend: a run stopped by a time
    cap keeps what it measured)."""
    base = next((r["ms_per_step"] for r in rows if r["backend"] == "torch" and r["ms_per_step"]), None)
    for r in rows:
        if base and r["ms_per_step"]:
            r["speedup_vs_torch"] = round(base / r["ms_per_step"], 2)
    table = [{k: r[k] for k in COLUMNS} for r in rows]
    write_csv(table, out / f"{name}.csv")
    text = markdown(rows, peak, f"up to {steps}", note)
    (out / f"{name}.md").write_text(text)
    return table, text


def main(argv=None) -> list[dict]:
    on_gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="a 2-layer, 32-wide model on 16 tokens: a smoke test of the script")
    ap.add_argument("--preset", default="gpt2" if on_gpu else "tiny", help="model size (default gpt2 on CUDA, tiny on the CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16 on CUDA, 8 on the CPU)")
    ap.add_argument("--seq-len", type=int, default=None, help="context length (default: the preset's block size)")
    ap.add_argument("--backends", default=None, help=f"comma-separated subset of {','.join(BACKENDS)} (default: all on CUDA; "
                    "without triton on the CPU, where the Triton interpreter takes minutes per step)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps at most (default 20)")
    ap.add_argument("--budget-s", type=float, default=10.0, help="seconds of timed steps per backend at most (default 10)")
    ap.add_argument("--name", default="train", help="file name stem of the results (default train)")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<hardware>-<date>/)")
    ap.add_argument("--return-logits", action="store_true",
                    help="the loss from the whole logits (GPT.loss), not the fused linear + cross-entropy training uses")
    args = ap.parse_args(argv)
    backends = args.backends.split(",") if args.backends else [b for b in BACKENDS if on_gpu or b != "triton"]
    for b in backends:
        if b not in BACKENDS:
            ap.error(f"--backends: unknown backend {b!r}; choose from {','.join(BACKENDS)}")
    device = torch.device("cuda" if on_gpu else "cpu")
    preset, batch = args.preset, args.batch_size or (16 if on_gpu else 8)
    seq_len = args.seq_len or GPTConfig.from_preset(preset).block_size
    steps, warmup = args.steps, 3
    if args.toy:  # the preset shrunk to almost nothing
        batch, seq_len, steps, warmup = 2, 16, 2, 1
        llama = dict(n_kv_head=1, head_dim=None, intermediate_size=64) if GPTConfig.from_preset(preset).arch == "llama" else {}
        config = GPTConfig.from_preset(preset, vocab_size=256, block_size=seq_len, n_layer=2, n_head=2, n_embd=32, **llama)
        preset += " (toy)"
    else:
        config = GPTConfig.from_preset(preset, block_size=seq_len)
    out = results_dir(args.out)
    peak = peaks(out, toy=args.toy)

    rows = []
    for backend in backends:
        try:
            row = bench_backend(preset, config, backend, device, batch, seq_len, steps, warmup, args.budget_s,
                                peak["matmul_tflops"], args.return_logits)
        except (RuntimeError, torch.OutOfMemoryError) as err:  # e.g. no compiler for inductor, out of memory
            print(f"{backend}: failed: {str(err).splitlines()[0][:200]}", file=sys.stderr)
            row = dict.fromkeys(COLUMNS, None) | dict(preset=preset, backend=backend, device=str(device), batch=batch,
                                                       seq_len=seq_len, error=str(err).splitlines()[0][:80])
        rows.append(row)
        print(", ".join(f"{k}={row[k]}" for k in COLUMNS), flush=True)
        table, text = save(rows, out, peak, steps, note="" if on_gpu or "triton" in backends else
                           "triton left out: under the CPU's Triton interpreter a step takes minutes.", name=args.name)
        if on_gpu:
            torch.cuda.empty_cache()
    ok = [r for r in table if r["tokens_per_s"]]
    if ok and not args.toy:
        plot_bars(ok, "backend", ["tokens_per_s", "mfu_pct"], out / f"{args.name}.png", f"training, {preset}, {device.type}")
    print(text)
    return table


if __name__ == "__main__":
    main()
