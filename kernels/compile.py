"""Ahead-of-time compile of every kernel build the launchers pick, for sm_80 and sm_90, no GPU needed.

    python -m kernels.compile [--arch 80 90] [--module kernels.rmsnorm ...] [--jobs N] [--fresh] [--json]
                              [--record [FILE] [--update-record]] [--sample]

Each kernel module lists in `aot_configs()` the launches its launchers make (kernels/launch.py:
kernel, grid, arguments, constexprs, num_warps, num_stages), computed by the launchers' own code
on meta tensors, each with a label (kernel, arch, config), whether it needs wgmma, and which
integer parameters must enter 64-bit offsets ("wide"). Each is turned into the source Triton's JIT would compile for it (argument
types, 16-divisibility and constants specialised by Triton's own rule, see `jit_source`) and
compiled with Triton's bundled toolchain (`triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))`, which runs ptxas); its cubin is read with `cuobjdump -res-usage`. The table shows
registers per thread, stack bytes (register spills), shared memory bytes (Triton's dynamic
allocation plus static), the number of wgmma instructions and of TMA copies (`cp.async.bulk.tensor`)
in the PTX, how many wgmma groups stay in flight while exponentials run ("overlap": committed, then
an `ex2` before the next `wgmma.wait_group`; the forward's softmax running beside the next QKᵀ),
and how many CTAs of the build fit on one SM at once (registers × threads and shared
memory against the arch's per-SM limits, as CUDA's occupancy calculator counts them). Below the
table, one line per kernel puts a representative build of ours beside the configuration of the
anchor it is measured against (the modules' AOT_ANCHORS: FlashAttention-3, Triton's tutorial,
Liger). The exit status is
non-zero when a build fails to compile, spills, overflows shared memory, lacks wgmma where its
module requires it, lacks the overlap where its module asks for it, has its wgmma serialized by
ptxas (its `-v` report, "C7514"-style: the hardware would then wait for each group anyway; checked
with the toolchain's ptxas on every build with wgmma), or computes in 32 bits an offset its module
says must be 64-bit ("wide").

The record (kernels/aot_record.json, --record) keeps each build's row under a key that changes
whenever what Triton would compile changes (the hash Triton gives the specialised source: the
kernel, the jit functions it calls, argument types, constants; plus the launch options, the arch
and Triton's version, which fixes the bundled ptxas). Triton's hash counts each kernel's starting
line, so any edit above a kernel in its file changes the keys of its builds too. With --record, builds found there are not
compiled again: a clean checkout (CI) compiles only the builds that changed since the record was
written, instead of about 13 CPU-minutes for the whole table. --update-record compiles what is
missing and rewrites the record for this Triton version and these archs. --sample compiles, without
the record, the first build of every kernel and arch: tests/test_compile.py checks the recorded rows
against it, so a record that does not match what this toolchain produces fails the tests.

Compiled kernels land in Triton's own cache (TRITON_CACHE_DIR, default ~/.triton/cache), never
in the repository; --fresh compiles into a temporary cache to time a cold build.
"""
import argparse
import concurrent.futures
import functools
import hashlib
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
from triton.backends.nvidia import compiler as nvidia_compiler
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import native_specialize_impl

from kernels.launch import Launch

MODULES = ("kernels.attention", "kernels.layernorm", "kernels.rmsnorm", "kernels.rope", "kernels.swiglu",
           "kernels.linear_cross_entropy", "kernels.sampling")
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block (A100, H100/H200)
# Per SM, both archs (CUDA programming guide, compute capability 8.0 and 9.0): 64K 32-bit registers in
# 4 partitions, allocated per warp in units of 256; at most 64 warps and 32 CTAs; shared memory 164 KB
# (sm_80) / 228 KB (sm_90), of which the system reserves 1 KB per CTA.
SM_REGS, SM_WARPS, SM_CTAS = 65536, 64, 32
SM_SMEM = {80: 164 * 1024, 90: 228 * 1024}
RECORD = Path(__file__).with_name("aot_record.json")
RECORDED = ("kernel", "arch", "config", "regs", "spill", "smem", "wgmma", "tma", "overlap", "ctas", "status")  # a row less its seconds
COLUMNS = ("kernel", "arch", "config", "regs", "spill", "smem", "wgmma", "tma", "overlap", "ctas", "seconds", "status")


@functools.cache
def collect_configs(modules: tuple[str, ...] = MODULES) -> list[dict]:
    """The builds of the kernel modules' aot_configs(), in `modules` order: one entry per (kernel,
    arch, config) label, holding every launch that carries it ("launches"). An import error is
    raised, not skipped."""
    builds = {}
    for name in modules:
        for cfg in importlib.import_module(name).aot_configs():
            key = (cfg["kernel"], cfg["arch"], cfg["config"])
            builds.setdefault(key, {**cfg, "launches": []})["launches"].append(cfg["launch"])
    return list(builds.values())


def cuobjdump() -> str:
    """Triton's bundled cuobjdump, else the CUDA toolkit's."""
    for path in (Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump",
                 shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if path and os.access(path, os.X_OK):
            return str(path)
    raise FileNotFoundError("cuobjdump not found (looked in triton/backends/nvidia/bin, PATH, /usr/local/cuda/bin)")


def jit_source(launch: Launch, arch: int) -> ASTSource:
    """What Triton's JIT compiles for this launch (triton/runtime/jit.py: JITFunction.run binds the
    arguments, specialises each with native_specialize_impl, then _pack_args): argument types from
    the values, tt.divisibility 16 on pointers aligned to 16 bytes and ints divisible by 16, ints
    equal to 1 as constants, except where the kernel says do_not_specialize. (Our kernels annotate
    no parameter but their constexprs, so annotated types need no mirroring.)"""
    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    values = fn.signature.bind(*launch.args, **launch.constexprs).arguments
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(backend, value, param.is_const, not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = backend.parse_attr(spec)
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def ptx_params(signature: dict) -> list[str]:
    """The kernel's runtime parameters in the order PTX numbers them: constexprs left out, and a
    tensor descriptor of rank r (type "tensordesc<bf16[1, 1, 64, 128]>") as 1 + 2r parameters, the
    CUtensorMap then its shape and strides (Triton 3.6 and 3.9 both pass them so)."""
    out = []
    for name, ty in signature.items():
        if ty == "constexpr":
            continue
        rank = len(re.search(r"\[([^\]]*)\]", ty).group(1).split(",")) if ty.startswith("tensordesc") else 0
        out += [name] * (1 + 2 * rank)
    return out


def widened_params(ptx: str) -> set[int]:
    """Indices of the kernel's 32-bit parameters that enter 64-bit arithmetic in its PTX: loaded
    sign-extended into a 64-bit register, or a source of a widening multiply or conversion, itself
    or through 32-bit register copies (a value chosen in a branch reaches its use through a mov)."""
    widened = set()
    for reg, index in re.findall(r"ld\.param\.[bsu]32\s+(%\w+), \[\w+_param_(\d+)\]", ptx):
        regs, todo = {reg}, [reg]
        while todo:
            for copy in re.findall(rf"\bmov\.[bsu]32\s+(%\w+), {todo.pop()}\b", ptx):
                if copy not in regs:
                    regs.add(copy)
                    todo.append(copy)
        if reg.startswith("%rd") or any(re.search(
                rf"\b(?:mul|mad)\.wide\.[su]32\s+%\w+, (?:[^;]*\s)?{r}\b|\bcvt\.[su]64\.[su]32\s+%\w+, {r}\b", ptx)
                for r in regs):
            widened.add(int(index))
    return widened


def wgmma_in_flight(ptx: str) -> int:
    """How many wgmma groups are left running while an exponential runs: a `wgmma.commit_group`
    followed by an `ex2` before the next `wgmma.wait_group`. 0 where every group is waited for at once."""
    return sum("ex2." in after.split("wgmma.wait_group")[0] for after in ptx.split("wgmma.commit_group")[1:])


def wgmma_serialized(ptx: str, arch: int) -> str | None:
    """ptxas's note when it serializes the build's wgmma (e.g. C7514: a non-wgmma instruction reads an
    accumulator still being written), from the toolchain's own ptxas run with -v; None when it does not."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        gpu = nvidia_compiler.sm_arch_from_capability(arch)
        log = subprocess.run([nvidia_compiler.get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(src), "-o",
                              str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=True).stderr
    note = re.search(r"\((C\d+)\) Potential Performance Loss: wgmma\.mma_async instructions are serialized", log)
    return note and note.group(1)


def ctas_per_sm(arch: int, regs: int, num_warps: int, smem: int) -> int:
    """How many CTAs of a build one SM holds at once: the least of what its registers (per warp,
    rounded up to 256, within each of the 4 register-file partitions), its warps, its shared memory
    (plus the 1 KB reserved per CTA, in 128-byte units) and the 32-CTA cap allow."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (SM_REGS // 4 // regs_per_warp) * 4 // num_warps
    by_smem = SM_SMEM[arch] // (-(-smem // 128) * 128 + 1024)
    return min(by_regs, SM_WARPS // num_warps, by_smem, SM_CTAS)


def compile_one(cfg: dict) -> dict:
    """Compile one build for its arch; returns a row of the table."""
    arch = cfg["arch"]
    row = {"kernel": cfg["kernel"], "arch": f"sm_{arch}", "config": cfg["config"]}
    t0 = time.perf_counter()
    try:
        # one label, one build: the launches sharing a label must not differ in what is compiled
        sources = [jit_source(launch, arch) for launch in cfg["launches"]]
        builds = {(src.hash(), *launch.options().items()) for src, launch in zip(sources, cfg["launches"])}
        if len(builds) > 1:
            raise ValueError(f"{len(builds)} different builds share this label")
        launch = cfg["launches"][0]
        kernel = triton.compile(sources[0], target=GPUTarget("cuda", arch, 32), options=launch.options())
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                                   check=True).stdout
        res = dict(re.findall(r"\b(REG|STACK|SHARED):(\d+)", usage))
        row.update(regs=int(res["REG"]), spill=int(res["STACK"]),
                   smem=kernel.metadata.shared + int(res["SHARED"]),
                   wgmma=len(re.findall(r"wgmma\.mma_async", kernel.asm["ptx"])),
                   tma=len(re.findall(r"cp\.async\.bulk\.tensor", kernel.asm["ptx"])),
                   overlap=wgmma_in_flight(kernel.asm["ptx"]))
        row["ctas"] = ctas_per_sm(arch, row["regs"], launch.num_warps, row["smem"])
        runtime = ptx_params(sources[0].signature)
        narrow = [name for name in cfg["wide"] if runtime.index(name) not in widened_params(kernel.asm["ptx"])]
        problems = [f"32-bit offsets: {' '.join(narrow)}"] if narrow else []
        if row["spill"]:
            problems.append("spills")
        if row["smem"] > SMEM_LIMIT[arch]:
            problems.append(f"smem > {SMEM_LIMIT[arch]}")
        if cfg["wgmma"] and not row["wgmma"]:
            problems.append("no wgmma")
        if cfg.get("overlap") and not row["overlap"]:
            problems.append("no overlap")
        if row["wgmma"] and (note := wgmma_serialized(kernel.asm["ptx"], arch)):
            problems.append(f"wgmma serialized ({note})")
        row["status"] = ", ".join(problems) or "ok"
    except Exception as err:  # a failed compile is a row of the report, not the end of it
        row.update(regs=None, spill=None, smem=None, wgmma=None, tma=None, overlap=None, ctas=None,
                   status=f"error: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def build_key(cfg: dict) -> str:
    """The record's key for a build: changes whenever what Triton compiles for it would (see the
    module's docstring)."""
    launch = cfg["launches"][0]
    text = (f"{jit_source(launch, cfg['arch']).hash()} {sorted(launch.options().items())} "
            f"sm_{cfg['arch']} triton {triton.__version__} {cfg['kernel']} {cfg['config']}")  # (two labels can share a build)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_record(path: Path) -> dict:
    """key -> recorded row; an absent file is an empty record."""
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(path: Path, record: dict):
    """One build per line, sorted: a kernel change shows in the diff as the lines of its builds."""
    lines = [f"{json.dumps(k)}: {json.dumps(record[k])}" for k in sorted(record)]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


_BUILDS: list[dict] = []  # what the forked compile workers read


def _compile_built(index: int) -> dict:
    return compile_one(_BUILDS[index])


def compile_builds(builds: list[dict], jobs: int | None = None) -> list[dict]:
    """compile_one of each build (entries like collect_configs' ones), on `jobs` processes."""
    jobs = min(jobs or os.cpu_count() or 1, max(len(builds), 1))
    if jobs == 1:
        return [compile_one(b) for b in builds]
    # fork: the workers inherit the imported kernels and the builds; each compile is independent and CPU-bound
    _BUILDS[:] = builds
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_built, range(len(builds))))


def compile_all(archs=(80, 90), jobs: int | None = None, modules: tuple[str, ...] = MODULES,
                record: dict | None = None, sample: bool = False) -> list[dict]:
    """Compile every build of `modules` for each of `archs`, on `jobs` processes, except those whose
    key is in `record` (their recorded row is returned, with "seconds" None); with a record, every
    row carries its build's "key". sample: only the first build of each kernel and arch."""
    builds = collect_configs(modules)
    work = [i for i, cfg in enumerate(builds) if cfg["arch"] in archs]
    if sample:
        firsts = {}
        for i in work:
            firsts.setdefault((builds[i]["kernel"], builds[i]["arch"]), i)
        work = sorted(firsts.values())
    if record is None:
        return compile_builds([builds[i] for i in work], jobs)
    keys = {i: build_key(builds[i]) for i in work}
    todo = [i for i in work if keys[i] not in record]
    rows = dict(zip(todo, compile_builds([builds[i] for i in todo], jobs)))
    return [{**(rows[i] if i in rows else {**record[keys[i]], "seconds": None}), "key": keys[i]} for i in work]


def updated_record(record: dict, rows: list[dict], archs, modules: tuple[str, ...] = MODULES) -> dict:
    """The record with this Triton version's entries for `archs` and `modules` replaced by `rows`
    (compile_all's with a record: each carries its key; the other versions' and archs' entries kept)."""
    kernels = {cfg["kernel"] for cfg in collect_configs(modules)}
    mine = lambda row: row["triton"] == triton.__version__ and int(row["arch"][3:]) in archs and row["kernel"] in kernels  # noqa: E731
    kept = {k: row for k, row in record.items() if not mine(row)}
    for row in rows:
        kept[row["key"]] = {**{c: row[c] for c in RECORDED}, "triton": triton.__version__}
    return kept


def format_table(rows: list[dict]) -> str:
    cells = [COLUMNS] + [tuple("-" if r[c] is None else str(r[c]) for c in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def anchors(modules: tuple[str, ...] = MODULES) -> list[dict]:
    """The modules' AOT_ANCHORS: kernel, arch, "ours" (words of one of our builds' labels) and
    "anchor" (the configuration of the implementation that kernel is measured against)."""
    return [a for name in modules for a in getattr(importlib.import_module(name), "AOT_ANCHORS", ())]


def ours_for(anchor: dict, rows: list[dict]) -> dict | None:
    """The first row of the anchor's kernel and arch whose label holds every word of its "ours"."""
    words = set(anchor["ours"].split())
    return next((r for r in rows if r["kernel"] == anchor["kernel"] and r["arch"] == f"sm_{anchor['arch']}"
                 and words <= set(r["config"].split())), None)


def format_anchors(rows: list[dict], modules: tuple[str, ...] = MODULES) -> str:
    """One line per anchored kernel built in rows: our build's resources beside the anchor's configuration."""
    lines = []
    for a in anchors(modules):
        r = ours_for(a, rows)
        if r is not None:
            lines.append(f"{a['kernel']} sm_{a['arch']}  ours: {r['config']} ({r['regs']} regs, {r['smem']} B smem, "
                         f"{r['ctas']} CTA/SM, {r['wgmma']} wgmma, {r['tma']} TMA, {r['overlap']} overlapped)  |  {a['anchor']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    parser.add_argument("--module", nargs="+", default=list(MODULES), choices=MODULES, dest="modules",
                        help="only these kernel modules' builds (default: all)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    parser.add_argument("--fresh", action="store_true", help="compile into an empty temporary cache")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--record", nargs="?", const=RECORD, type=Path, default=None, metavar="FILE",
                        help="take the rows of unchanged builds from this record instead of compiling them "
                             "(default file: kernels/aot_record.json)")
    parser.add_argument("--update-record", action="store_true",
                        help="with --record: compile what the record lacks and rewrite it for this Triton version and --arch")
    parser.add_argument("--sample", action="store_true",
                        help="only the first build of each kernel and arch, compiled (the record's spot check)")
    args = parser.parse_args(argv)
    if args.update_record and (args.record is None or args.sample):
        parser.error("--update-record needs --record and the whole table (no --sample)")
    record = read_record(args.record) if args.record else None
    with tempfile.TemporaryDirectory() as cache:
        if args.fresh:
            os.environ["TRITON_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        rows = compile_all(tuple(args.arch), args.jobs, tuple(args.modules), None if args.sample else record, args.sample)
        elapsed = time.perf_counter() - t0
    if args.update_record:
        write_record(args.record, updated_record(record, rows, args.arch, tuple(args.modules)))
    bad = [r for r in rows if r["status"] != "ok"]
    if args.json:
        print(json.dumps(rows))
    else:
        print(format_table(rows))
        if text := format_anchors(rows, tuple(args.modules)):
            print("\nours beside the anchors\n" + text)
        fresh = sum(r["seconds"] is not None for r in rows)
        print(f"\n{len(rows)} builds ({fresh} compiled, {len(rows) - fresh} from the record) in {elapsed:.1f} s; "
              f"{len(bad)} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
