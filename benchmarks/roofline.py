"""The machine's own ceilings: device-to-device copy bandwidth and dense matmul throughput.

    python benchmarks/roofline.py [--toy] [--out DIR]         # measure, write roofline.csv / .md
    python benchmarks/roofline.py --annotate DIR               # + attention/layernorm as % of these

Other benchmarks quote their figures as a percentage of these measured peaks rather than of a
datasheet number: a 1 GiB tensor copied into another (GB/s counts the read and the write) and an
8192^3 bf16 matmul (2·M·N·K FLOPs), each the median of many runs timed with CUDA events
(triton's do_bench, through benchmarks.common.time_ms). On the CPU the same two probes run in
float32 at smaller sizes with the wall clock. Writes roofline.csv: metric, dtype, size, ms, value,
unit. `peaks(out)` reads the folder's roofline.csv (measuring first when it is missing).
"""
import argparse
import csv
import sys
from pathlib import Path

import torch

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import results_dir, sig, time_ms, write_csv  # noqa: E402

COLUMNS = ("metric", "device", "dtype", "size", "ms", "value", "unit")


def sizes(on_gpu: bool, toy: bool) -> tuple[int, int, torch.dtype]:
    """(bytes to copy, matmul side, matmul dtype)."""
    if on_gpu and not toy:
        return 1 << 30, 8192, torch.bfloat16  # far beyond L2; large enough to saturate the tensor cores
    if toy:
        return 1 << 20, 128, torch.float32
    return 1 << 28, 1024, torch.float32  # CPUs have no bf16 matmul worth quoting


def measure(toy: bool = False) -> list[dict]:
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    nbytes, n, dtype = sizes(on_gpu, toy)
    reps = dict(warmup=1, reps=3) if toy else dict(warmup=5, reps=100 if on_gpu else 10)

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), **reps)
    del src, dst
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = time_ms(lambda: torch.mm(a, b), **reps)
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    return [
        dict(metric="copy", device=name, dtype="uint8", size=f"{nbytes} B", ms=round(copy_ms, 4),
             value=sig(2 * nbytes / copy_ms / 1e6), unit="GB/s"),
        dict(metric="matmul", device=name, dtype=str(dtype).removeprefix("torch."), size=f"{n}x{n}x{n}",
             ms=round(mm_ms, 4), value=sig(2 * n**3 / mm_ms / 1e9), unit="TFLOP/s"),
    ]


def peaks(out: Path, toy: bool = False) -> dict:
    """{"copy_gbps": ..., "matmul_tflops": ..., "matmul_dtype": ...} from out/roofline.csv, measured
    and written first when the folder has none (so a lone benchmark run still gets percentages)."""
    path = Path(out) / "roofline.csv"
    if not path.is_file():
        write_csv(measure(toy), path)
    with open(path) as f:
        rows = {r["metric"]: r for r in csv.DictReader(f)}
    return {"copy_gbps": float(rows["copy"]["value"]), "matmul_tflops": float(rows["matmul"]["value"]),
            "matmul_dtype": rows["matmul"]["dtype"]}


def markdown(rows: list[dict]) -> str:
    lines = ["## Roofline (measured on this machine)", "", "| probe | dtype | size | median ms | figure |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['dtype']} | {r['size']} | {r['ms']} | {r['value']} {r['unit']} |")
    return "\n".join(lines) + "\n"


def annotate(out: Path) -> str:
    """attention.csv and layernorm.csv of the folder, best figure of ours per case, as % of peak."""
    p = peaks(out)
    lines = ["## Kernels as a share of the roofline", "",
             f"bf16 matmul peak {p['matmul_tflops']} TFLOP/s, copy {p['copy_gbps']} GB/s (roofline.csv).", "",
             "| benchmark | case | ours | % of peak |", "|---|---|---|---|"]
    att, ln = Path(out) / "attention.csv", Path(out) / "layernorm.csv"
    if att.is_file():
        with open(att) as f:
            rows = [r for r in csv.DictReader(f) if r["impl"] == "ours" and r["tflops"] and r["mode"] != "decode"]
        best = {}
        for r in rows:
            key = f"{r['mode']} D={r['head_dim']} {'causal' if r['causal'] == 'True' else 'full'}"
            if key not in best or float(r["tflops"]) > float(best[key]["tflops"]):
                best[key] = r
        for key, r in best.items():
            tf = float(r["tflops"])
            lines.append(f"| attention | {key}, best S={r['seqlen']} | {tf:.1f} TFLOP/s | {100 * tf / p['matmul_tflops']:.0f}% |")
    if ln.is_file():
        with open(ln) as f:
            rows = [r for r in csv.DictReader(f) if r["provider"] == "triton"]
        for r in rows:
            gbps = float(r["GB/s"])
            lines.append(f"| layernorm | {r['mode']} N={r['N']} | {gbps:.0f} GB/s | {100 * gbps / p['copy_gbps']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="tiny sizes: a smoke test of the script")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<hardware>-<date>/)")
    ap.add_argument("--annotate", metavar="DIR", default=None,
                    help="write DIR/roofline_share.md: attention and layernorm results as % of DIR/roofline.csv")
    args = ap.parse_args(argv)
    if args.annotate:
        text = annotate(Path(args.annotate))
        (Path(args.annotate) / "roofline_share.md").write_text(text)
        print(text)
        return
    rows = measure(args.toy)
    out = results_dir(args.out)
    write_csv(rows, out / "roofline.csv")
    (out / "roofline.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
