"""RoPE bandwidth: kernels.apply_rope (q and k in one launch) against the torch backend's
apply_rope (Hugging Face's formula in eager PyTorch) and torch.compile of it, next to a plain
device-to-device copy.

    python benchmarks/rope.py [--toy] [--out DIR]

q and k are laid out as the model makes them: slices of one [B, T, H + 2·Hkv, D] projection,
transposed to [B, heads, T, D]; positions [B, T] (left padding). GB/s counts the tensors that must
cross memory (the tables are negligible): forward reads q, k and writes q', k'; backward reads
dq', dk' and writes dq, dk; "both" is the sum. bf16, Llama-3-8B heads (H = 32, Hkv = 8, D = 128),
B = 4, T from 512 to 8192 on a GPU; --toy is a tiny fp32 run on the CPU (Triton interpreter).
Writes rope.csv and rope.png under benchmarks/results/<hardware>-<date>/ (or --out).
"""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import copy_gbps, kernel_bench_args, plot_lines, results_dir, sig, time_pass, write_csv  # noqa: E402
from engine import reference  # noqa: E402
from engine.backends import TorchBackend  # noqa: E402
from kernels import apply_rope  # noqa: E402

COLUMNS = ("mode", "T", "B", "H", "Hkv", "D", "dtype", "provider", "ms", "GB/s", "copy GB/s", "fraction of copy")
MODES = {"forward": 2, "backward": 2, "both": 4}  # times the bytes of q and k moved


def providers(on_gpu: bool) -> dict:
    """name -> fn(q, k, cos, sin, positions) -> (q', k')."""
    found = {"triton": apply_rope, "torch": TorchBackend().apply_rope}
    if on_gpu:  # inductor on the CPU would spend the toy run compiling
        found["torch.compile"] = torch.compile(TorchBackend().apply_rope, dynamic=True)
    return found


def timed(fn, args, grads, mode: str, **reps) -> float:
    """Milliseconds of one pass (common.time_pass) of fn(q, k, cos, sin, positions), gradients of q and k."""
    return time_pass(lambda: fn(*args), args[:2], grads, mode, **reps)


def main(argv=None) -> list[dict]:
    args, on_gpu, device, reps = kernel_bench_args(__doc__, argv)
    dtype, b, h, hkv, d, lengths = ((torch.bfloat16, 4, 32, 8, 128, (512, 2048, 8192)) if on_gpu
                                    else (torch.float32, 2, 2, 1, 16, (4, 16)))

    fns = providers(on_gpu)
    cos, sin = reference.rope_tables(d, max(lengths) + 64, 500000.0, device=device)
    rows = []
    for t in lengths:
        qkv = torch.randn(b, t, h + 2 * hkv, d, device=device, dtype=dtype)
        q, k, _ = (x.transpose(1, 2) for x in qkv.split([h, hkv, hkv], dim=2))
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
        positions = (torch.arange(t, device=device)[None] - torch.arange(b, device=device)[:, None] * 7).clamp(min=0)
        grads = (torch.randn(b, h, t, d, device=device, dtype=dtype), torch.randn(b, hkv, t, d, device=device, dtype=dtype))
        nbytes = (q.numel() + k.numel()) * q.element_size()
        copy = copy_gbps(torch.randn(q.numel() + k.numel(), device=device, dtype=dtype), **reps)
        for name, fn in fns.items():
            for mode, times in MODES.items():
                ms = timed(fn, (q, k, cos, sin, positions), grads, mode, **reps)
                gbps = times * nbytes / ms / 1e6
                rows.append(dict(zip(COLUMNS, (mode, t, b, h, hkv, d, str(dtype).removeprefix("torch."), name,
                                               round(ms, 4), sig(gbps), sig(copy), sig(gbps / copy)))))
                print(", ".join(f"{key}={v}" for key, v in rows[-1].items()), flush=True)
    out = results_dir(args.out)
    write_csv(rows, out / "rope.csv")
    plot_lines(rows, x="T", y="GB/s", series="provider", facet="mode", path=out / "rope.png",
               title=f"RoPE {rows[0]['dtype']}, B={b}, H={h}, Hkv={hkv}, D={d}: GB/s")
    summary(rows)
    print(f"wrote {out / 'rope.csv'} and {out / 'rope.png'}")
    return rows


def summary(rows, key="T"):
    """Ours as a share of a copy, and how many times faster than each other provider."""
    by = {(r["mode"], r[key], r["provider"]): r for r in rows}
    for (mode, size, name), r in sorted(by.items()):
        if name != "triton":
            continue
        parts = [f"{mode:8s} {key}={size:5d}: {r['GB/s']:.4g} GB/s = {100 * r['fraction of copy']:.3g}% of copy"]
        for other in ("torch", "torch.compile"):
            if (mode, size, other) in by:
                parts.append(f"{by[(mode, size, other)]['ms'] / r['ms']:.3g}x {other}")
        print(", ".join(parts))


if __name__ == "__main__":
    main()
