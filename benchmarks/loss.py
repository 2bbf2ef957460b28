"""The training loss's memory and time: kernels.linear_cross_entropy (fused, chunked; the logits
never exist whole) against eager (F.linear, then F.cross_entropy over the whole [N, V] logits), the
torch backend's chunked version (engine.backends.chunked_linear_cross_entropy) and Liger Kernel's
fused linear cross-entropy (when liger_kernel is installed).

    python benchmarks/loss.py [--toy] [--out DIR]

Each row is one forward + backward (gradients of h and the head weight) of the mean loss over N
tokens, a tenth of them ignored (target -1). peak MB: the memory that pass adds on top of its
inputs (CUDA's allocator peak on a GPU; the resident set's rise on the CPU). On a GPU: bf16,
N = 16k tokens at V = 128k, C = 2048 (a Llama-3-sized head: the suite's target, fused peak memory
<= 1/4 of eager's and time <= Liger's) and GPT-2's head (V = 50257, C = 768) at 8k tokens. --toy is
a tiny fp32 run on the CPU (Triton interpreter). Writes loss.csv and loss.png under
benchmarks/results/<hardware>-<date>/ (or --out).
"""
import gc
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import kernel_bench_args, plot_bars, results_dir, sig, time_ms, write_csv  # noqa: E402
from benchmarks.train import PeakMemory  # noqa: E402
from engine.backends import chunked_linear_cross_entropy  # noqa: E402
from kernels import linear_cross_entropy  # noqa: E402

COLUMNS = ("N", "V", "C", "dtype", "provider", "ms", "peak_mb", "mem_vs_eager", "time_vs_eager")


def eager(h, weight, targets):
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-1)


def providers() -> dict:
    """name -> fn(h, weight, targets) -> mean loss over the targets that are not -1."""
    found = {"eager": eager, "torch-chunked": chunked_linear_cross_entropy, "fused": linear_cross_entropy}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return found
    liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-1)
    found["liger"] = lambda h, weight, targets: liger(weight, h, targets)
    return found


def measure(fn, h, weight, targets, device, reps) -> tuple[float, float | None]:
    """(ms, peak MB over the inputs) of one forward + backward of fn."""

    def step():
        return torch.autograd.grad(fn(h, weight, targets), (h, weight))

    mem = PeakMemory(torch.device(device))
    mem.reset()
    grads = step()  # the first run: its peak is the one reported (the allocator starts from the inputs)
    peak = mem.read()
    del grads
    gc.collect()
    return time_ms(step, **reps), peak


def main(argv=None) -> list[dict]:
    args, on_gpu, device, reps = kernel_bench_args(__doc__, argv)
    dtype, sizes = ((torch.bfloat16, ((16384, 131072, 2048), (8192, 50257, 768))) if on_gpu
                    else (torch.float32, ((64, 300, 32),)))
    rows = []
    g = torch.Generator().manual_seed(0)
    for n, v, c in sizes:
        h = torch.randn(n, c, generator=g).to(device, dtype).requires_grad_()
        weight = (torch.randn(v, c, generator=g) * 0.02).to(device, dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), generator=g)
        targets[torch.rand(n, generator=g) < 0.1] = -1
        targets = targets.to(device)
        base = {}
        for name, fn in providers().items():
            ms, peak = measure(fn, h, weight, targets, device, reps)
            base.setdefault("ms", ms)
            base.setdefault("peak", peak)
            rows.append(dict(zip(COLUMNS, (n, v, c, str(dtype).removeprefix("torch."), name, round(ms, 4),
                                           None if peak is None else round(peak, 1),
                                           None if peak is None or not base["peak"] else sig(peak / base["peak"]),
                                           sig(ms / base["ms"])))))
            print(", ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    out = results_dir(args.out)
    write_csv(rows, out / "loss.csv")
    bars = [{"case": f"{r['provider']} V={r['V']}", "ms": r["ms"], "peak MB": r["peak_mb"]} for r in rows]
    plot_bars(bars, x="case", ys=["ms", "peak MB"], path=out / "loss.png",
              title=f"linear + cross-entropy forward + backward, {rows[0]['dtype']}")
    print(f"wrote {out / 'loss.csv'} and {out / 'loss.png'}")
    return rows


if __name__ == "__main__":
    main()
