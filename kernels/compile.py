"""Ahead-of-time compile of every shipped kernel configuration for sm_80 and sm_90, no GPU needed.

    python -m kernels.compile [--arch 80 90] [--jobs N] [--fresh] [--json]

Each kernel module lists its shipped launch configurations in `aot_configs()` (see
kernels/attention.py). Every one is compiled with Triton's bundled toolchain
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, which runs ptxas) and
its cubin is read with `cuobjdump -res-usage`. The table shows registers per thread, stack
bytes (register spills), shared memory bytes (Triton's dynamic allocation plus static) and the
number of wgmma instructions in the PTX. The exit status is non-zero when a configuration fails
to compile, spills, overflows shared memory, or lacks wgmma where its module requires it.

Compiled kernels land in Triton's own cache (TRITON_CACHE_DIR, default ~/.triton/cache), never
in the repository; --fresh compiles into a temporary cache to time a cold build.
"""
import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

MODULES = ("kernels.attention", "kernels.layernorm")
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block (A100, H100/H200)
COLUMNS = ("kernel", "arch", "config", "regs", "spill", "smem", "wgmma", "seconds", "status")


def collect_configs() -> list[dict]:
    """aot_configs() of every kernel module, in MODULES order. An import error is raised, not skipped."""
    return [cfg for name in MODULES for cfg in importlib.import_module(name).aot_configs()]


def cuobjdump() -> str:
    """Triton's bundled cuobjdump, else the CUDA toolkit's."""
    for path in (Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump",
                 shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if path and os.access(path, os.X_OK):
            return str(path)
    raise FileNotFoundError("cuobjdump not found (looked in triton/backends/nvidia/bin, PATH, /usr/local/cuda/bin)")


def _attrs(signature: dict) -> dict:
    """Specialise like the JIT does for contiguous tensors: pointers and strides 16-divisible."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
            if ty.startswith("*") or name.startswith("stride")}


def compile_one(cfg: dict, arch: int) -> dict:
    """Compile one configuration for one arch; returns a row of the table."""
    row = {"kernel": cfg["kernel"], "arch": f"sm_{arch}", "config": cfg["config"]}
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=cfg["fn"], signature=cfg["signature"], constexprs=cfg["constexprs"],
                        attrs=_attrs(cfg["signature"]))
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                                   check=True).stdout
        res = dict(re.findall(r"\b(REG|STACK|SHARED):(\d+)", usage))
        row.update(regs=int(res["REG"]), spill=int(res["STACK"]),
                   smem=kernel.metadata.shared + int(res["SHARED"]),
                   wgmma=len(re.findall(r"wgmma\.mma_async", kernel.asm["ptx"])))
        problems = []
        if row["spill"]:
            problems.append("spills")
        if row["smem"] > SMEM_LIMIT[arch]:
            problems.append(f"smem > {SMEM_LIMIT[arch]}")
        if arch >= 90 and cfg["wgmma"] and not row["wgmma"]:
            problems.append("no wgmma")
        row["status"] = ", ".join(problems) or "ok"
    except Exception as err:  # a failed compile is a row of the report, not the end of it
        row.update(regs=None, spill=None, smem=None, wgmma=None,
                   status=f"error: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _compile_index(job):
    index, arch = job
    return compile_one(collect_configs()[index], arch)


def compile_all(archs=(80, 90), jobs: int | None = None) -> list[dict]:
    """Compile every shipped configuration for each of `archs` it ships for, on `jobs` processes."""
    configs = collect_configs()
    work = [(i, arch) for i, cfg in enumerate(configs) for arch in archs if arch in cfg["archs"]]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_index(job) for job in work]
    # fork: the workers inherit the imported kernels; each compile is independent and CPU-bound
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_index, work))


def format_table(rows: list[dict]) -> str:
    cells = [COLUMNS] + [tuple("-" if r[c] is None else str(r[c]) for c in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    parser.add_argument("--fresh", action="store_true", help="compile into an empty temporary cache")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        if args.fresh:
            os.environ["TRITON_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        rows = compile_all(tuple(args.arch), args.jobs)
        elapsed = time.perf_counter() - t0
    bad = [r for r in rows if r["status"] != "ok"]
    if args.json:
        print(json.dumps(rows))
    else:
        print(format_table(rows))
        print(f"\n{len(rows)} builds in {elapsed:.1f} s; {len(bad)} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
