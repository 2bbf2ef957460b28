"""Shared plumbing for the benchmark scripts: where results go, timing, CSV and plots."""
import argparse
import csv
import datetime
import platform
import re
import statistics
import textwrap
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def hardware_name() -> str:
    """'NVIDIA-H200' on a GPU, else the CPU's name, as a folder-safe string."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or platform.machine() or "cpu")
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def results_dir(out: str | None = None) -> Path:
    """benchmarks/results/<hardware>-<date>/ unless `out` names another folder."""
    path = Path(out) if out else RESULTS / f"{hardware_name()}-{datetime.date.today().isoformat()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def time_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of fn(): CUDA events via triton's do_bench on a GPU, wall clock on the CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup * 5, rep=reps * 5, return_mode="median")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def kernel_bench_args(doc: str, argv=None, add_args=None):
    """The memory-bound kernel benchmarks' command line (--toy, --out, and what add_args(parser)
    adds) -> (args, on_gpu: full sizes on CUDA, device, reps for time_ms)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if add_args:
        add_args(parser)
    parser.add_argument("--toy", action="store_true", help="tiny sizes, for a CPU smoke run")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<hardware>-<date>)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.toy
    reps = {"warmup": 2, "reps": 10} if on_gpu else {"warmup": 1, "reps": 2}
    return args, on_gpu, "cuda" if torch.cuda.is_available() else "cpu", reps


def time_pass(forward, inputs, grads, mode: str, **reps) -> float:
    """Milliseconds for one forward (no graph), one backward (graph kept, gradients of `inputs`
    for output gradients `grads`), or one forward + backward ("both") of forward()."""
    if mode == "forward":
        with torch.no_grad():
            return time_ms(forward, **reps)
    if mode == "backward":
        outs = forward()
        return time_ms(lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True), **reps)
    return time_ms(lambda: torch.autograd.grad(forward(), inputs, grads), **reps)


def copy_gbps(t: torch.Tensor, **reps) -> float:
    """GB/s of copying t (read + write): the memory-bound kernels' yardstick."""
    t = t.detach()
    return 2 * t.numel() * t.element_size() / time_ms(lambda: torch.empty_like(t).copy_(t), **reps) / 1e6


def sig(v: float) -> float:
    """v to 4 significant digits, for the CSVs."""
    return float(f"{v:.4g}")


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def wrapped(title: str, panels: int) -> str:
    """A figure title broken into lines that fit `panels` panels side by side (long model names clipped)."""
    return "\n".join(textwrap.wrap(title, 55 * panels))


def plot_lines(rows: list[dict], x: str, y: str, series: str, path: Path, title: str, facet: str | None = None, logx: bool = True) -> Path:
    """One line per value of `series`, one panel per value of `facet`; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facets = sorted({r[facet] for r in rows}, key=str) if facet else [None]
    fig, axes = plt.subplots(1, len(facets), figsize=(5 * len(facets), 4), squeeze=False)
    for ax, fval in zip(axes[0], facets):
        sub = [r for r in rows if facet is None or r[facet] == fval]
        for name in sorted({r[series] for r in sub}, key=str):
            pts = sorted((r[x], r[y]) for r in sub if r[series] == name and r[y] not in (None, ""))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=str(name))
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if facet:
            ax.set_title(f"{facet}={fval}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(wrapped(title, len(facets)), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(rows: list[dict], x: str, ys: list[str], path: Path, title: str) -> Path:
    """One bar per row, one panel per column named in `ys`; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(4.5 * len(ys), 4), squeeze=False)
    labels = [str(r[x]) for r in rows]
    for ax, y in zip(axes[0], ys):
        values = [float(r[y]) if r[y] not in (None, "") else 0.0 for r in rows]
        ax.bar(labels, values, color="tab:blue")
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(y)
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(wrapped(title, len(ys)), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(out: Path, title: str, notes: list[str], names: list[str]) -> Path:
    """out/summary.md: a title, notes (hardware, software, caveats), then the out/<name>.md
    tables that exist, in the order of `names`."""
    parts = [f"# {title}", "", *[f"- {n}" for n in notes], ""]
    for name in names:
        md = Path(out) / f"{name}.md"
        if md.is_file():
            parts += [md.read_text().rstrip(), ""]
    path = Path(out) / "summary.md"
    path.write_text("\n".join(parts))
    return path
