"""LayerNorm / RMSNorm bandwidth: kernels.layer_norm against F.layer_norm, torch.compile (dynamic
shapes) of the reference and Liger Kernel's LayerNorm (when installed), next to a plain
device-to-device copy; --op rmsnorm: kernels.rms_norm against F.rms_norm, torch.compile of the
reference and Liger's RMSNorm, the same way.

    python benchmarks/layernorm.py [--op layernorm|rmsnorm] [--toy] [--out DIR]

GB/s counts the tensors that must cross memory (weights are negligible): forward reads x and
writes y; backward reads x and dy and writes dx; "both" is the sum of the two. bf16, M = 32768
rows, N from 768 to 16384 on a GPU; --toy is a tiny fp32 run on the CPU (Triton interpreter).
The provider "triton" runs the default backward layout (kernels.layernorm.BWD_LAYOUT) and
"triton-<other>" the other one, so that a GPU run can pick between them (issue 19).
Writes <op>.csv and <op>.png (layernorm.csv, rmsnorm.csv) under
benchmarks/results/<hardware>-<date>/ (or --out).
"""
import contextlib
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import copy_gbps, kernel_bench_args, plot_lines, results_dir, sig, time_pass, write_csv  # noqa: E402
from engine import reference  # noqa: E402
from kernels import layer_norm, layernorm, rms_norm  # noqa: E402

COLUMNS = ("mode", "N", "M", "dtype", "provider", "ms", "GB/s", "copy GB/s", "fraction of copy")
MODES = {"forward": 2, "backward": 3, "both": 5}  # tensors of M x N moved
OPS = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}


def _liger(op: str):
    """Liger Kernel's op as fn(x, *params, eps); ImportError when it is not installed."""
    if op == "rmsnorm":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        # offset 0, Llama casting (rstd in fp32), not in place: the backward timing reuses dy
        return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return LigerLayerNormFunction.apply


def providers(on_gpu: bool, op: str = "layernorm") -> dict:
    """name -> fn(x, *params, eps), params: (weight, bias) for layernorm, (weight,) for rmsnorm."""
    if op == "rmsnorm":
        found = {"triton": rms_norm, "torch": lambda x, w, eps: F.rms_norm(x, x.shape[-1:], w, eps)}
    else:
        found = {"triton": layer_norm, "torch": lambda x, w, b, eps: F.layer_norm(x, x.shape[-1:], w, b, eps)}
    if on_gpu:  # inductor on the CPU would spend the toy run compiling
        # dynamic: one compile serves every N (the suite gives this script well under a minute)
        found["torch.compile"] = torch.compile(reference.rms_norm if op == "rmsnorm" else reference.layer_norm,
                                               dynamic=True)
        try:
            found["liger"] = _liger(op)
        except ImportError:
            print("liger-kernel not installed: skipping it")
    return found


@contextlib.contextmanager
def backward_layout(layout: str):
    """Run the LayerNorm/RMSNorm backward kernels with this layout's table (kernels.layernorm._BWD_CONFIGS)."""
    saved, layernorm.BWD_LAYOUT = layernorm.BWD_LAYOUT, layout
    try:
        yield
    finally:
        layernorm.BWD_LAYOUT = saved


def timed(fn, x, params, dy, mode: str, **reps) -> float:
    """Milliseconds of one pass (common.time_pass) of fn(x, *params, eps)."""
    return time_pass(lambda: fn(x, *params, 1e-5), (x, *params), dy, mode, **reps)


def main(argv=None) -> list[dict]:
    args, on_gpu, device, reps = kernel_bench_args(__doc__, argv, lambda p: p.add_argument(
        "--op", choices=sorted(OPS), default="layernorm", help="the norm to time (default layernorm)"))
    dtype, m, sizes = (torch.bfloat16, 32768, (768, 1024, 2048, 4096, 8192, 16384)) if on_gpu else (torch.float32, 16, (16, 64))

    fns = providers(on_gpu, args.op)
    layouts = {"triton": layernorm.BWD_LAYOUT, **{f"triton-{other}": other for other in layernorm._BWD_CONFIGS
                                                   if other != layernorm.BWD_LAYOUT}}
    fns.update({name: fns["triton"] for name in layouts if name != "triton"})
    rows = []
    for n in sizes:
        x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        params = tuple(torch.randn(n, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(2 if args.op == "layernorm" else 1))  # weight (and bias)
        dy = torch.randn_like(x)
        nbytes = m * n * x.element_size()
        copy = copy_gbps(x, **reps)
        for name, fn in fns.items():
            for mode, tensors in MODES.items():
                with backward_layout(layouts.get(name, layernorm.BWD_LAYOUT)):
                    ms = timed(fn, x, params, dy, mode, **reps)
                gbps = tensors * nbytes / ms / 1e6
                rows.append(dict(zip(COLUMNS, (mode, n, m, str(dtype).removeprefix("torch."), name, round(ms, 4),
                                               sig(gbps), sig(copy), sig(gbps / copy)))))
                print(", ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    out = results_dir(args.out)
    write_csv(rows, out / f"{args.op}.csv")
    plot_lines(rows, x="N", y="GB/s", series="provider", facet="mode", path=out / f"{args.op}.png",
               title=f"{OPS[args.op]} {rows[0]['dtype']}, M={m}: GB/s")
    _summary(rows)
    print(f"wrote {out / f'{args.op}.csv'} and {out / f'{args.op}.png'}")
    return rows


def _summary(rows):
    """The issue's targets: forward vs copy for N >= 1024, fwd+bwd vs torch eager and Liger (and the
    default backward layout against the other)."""
    by = {(r["mode"], r["N"], r["provider"]): r for r in rows}
    for (mode, n, name), r in sorted(by.items()):
        if name != "triton":
            continue
        parts = [f"{mode:8s} N={n:5d}: {r['GB/s']:.4g} GB/s = {100 * r['fraction of copy']:.3g}% of copy"]
        for other in ("torch", "torch.compile", "liger", *sorted({p for _, _, p in by if p.startswith("triton-")})):
            if (mode, n, other) in by:
                parts.append(f"{by[(mode, n, other)]['ms'] / r['ms']:.3g}x {other}")
        print(", ".join(parts))


if __name__ == "__main__":
    main()
