"""SwiGLU bandwidth: kernels.swiglu (one fused pass) against PyTorch's two ops F.silu(gate) * up
(the torch backend's) and torch.compile of them, next to a plain device-to-device copy.

    python benchmarks/swiglu.py [--toy] [--out DIR]

This decides whether the fused kernel earns its place in TritonBackend.swiglu: issue 16 keeps it
only where it beats the two PyTorch ops (the "x torch" column of the summary, on a GPU).
gate and up are laid out as the model makes them: the two halves of one [M, 2N] projection.
GB/s counts the tensors that must cross memory: forward reads gate, up and writes y (3 x M x N);
backward reads gate, up, dy and writes dgate, dup (5); "both" is the sum. bf16, M = 8192 tokens,
N (intermediate size) from 2048 to 14336 on a GPU; --toy is a tiny fp32 run on the CPU (Triton
interpreter). Writes swiglu.csv and swiglu.png under benchmarks/results/<hardware>-<date>/ (or --out).
"""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import copy_gbps, kernel_bench_args, plot_lines, results_dir, sig, time_pass, write_csv  # noqa: E402
from benchmarks.rope import summary  # noqa: E402
from kernels import swiglu  # noqa: E402

COLUMNS = ("mode", "N", "M", "dtype", "provider", "ms", "GB/s", "copy GB/s", "fraction of copy")
MODES = {"forward": 3, "backward": 5, "both": 8}  # tensors of M x N moved


def torch_swiglu(gate, up):
    return F.silu(gate) * up


def providers(on_gpu: bool) -> dict:
    """name -> fn(gate, up)."""
    found = {"triton": swiglu, "torch": torch_swiglu}
    if on_gpu:  # inductor on the CPU would spend the toy run compiling
        found["torch.compile"] = torch.compile(torch_swiglu, dynamic=True)
    return found


def timed(fn, x, dy, mode: str, **reps) -> float:
    """Milliseconds of one pass (common.time_pass) of fn(gate, up), the halves of the [M, 2N] projection x."""
    return time_pass(lambda: fn(*x.chunk(2, dim=-1)), x, dy, mode, **reps)


def main(argv=None) -> list[dict]:
    args, on_gpu, device, reps = kernel_bench_args(__doc__, argv)
    dtype, m, sizes = (torch.bfloat16, 8192, (2048, 5632, 14336)) if on_gpu else (torch.float32, 8, (16, 100))

    fns = providers(on_gpu)
    rows = []
    for n in sizes:
        x = torch.randn(m, 2 * n, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(m, n, device=device, dtype=dtype)
        nbytes = m * n * x.element_size()
        copy = copy_gbps(dy, **reps)
        for name, fn in fns.items():
            for mode, tensors in MODES.items():
                ms = timed(fn, x, dy, mode, **reps)
                gbps = tensors * nbytes / ms / 1e6
                rows.append(dict(zip(COLUMNS, (mode, n, m, str(dtype).removeprefix("torch."), name, round(ms, 4),
                                               sig(gbps), sig(copy), sig(gbps / copy)))))
                print(", ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    out = results_dir(args.out)
    write_csv(rows, out / "swiglu.csv")
    plot_lines(rows, x="N", y="GB/s", series="provider", facet="mode", path=out / "swiglu.png",
               title=f"SwiGLU {rows[0]['dtype']}, M={m}: GB/s")
    summary(rows, key="N")
    print(f"wrote {out / 'swiglu.csv'} and {out / 'swiglu.png'}")
    return rows


if __name__ == "__main__":
    main()
