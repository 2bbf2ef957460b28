"""Tune the attention kernels' launch configs: time each entry's candidates on a GPU, keep the fastest correct one.

    python benchmarks/tune_attention.py [--write] [--kinds fwd dq ...] [--head-dims 64 128] [--dtypes 16-bit]
                                        [--budget-s S] [--out DIR] [--toy]
    python benchmarks/tune_attention.py --space [--intersect] [--arch 80 90] [--jobs N]     (offline, no GPU)

The table, kernels/attention_configs.json, holds one launch config per (arch, kind, dtype class, head
dim) and that entry's tuning space ("candidates", [BLOCK_M, BLOCK_N, warps, stages], the entry's own
config first). On a GPU this script takes the entries of the GPU's arch (sm_90 for Hopper and newer,
else sm_80) that have more than one candidate and, for each candidate in turn, runs the entry's kernel
with that config in place of the table's: first at a ragged check shape against engine/reference.py
(a candidate whose output or gradients are off is never chosen), then timed at a representative shape
with triton.testing.do_bench (median). The winner is the fastest correct candidate. It writes
attention_tuning.csv (every candidate's figures) and attention_configs.json (the table with the
winners) into the results folder; --write also rewrites kernels/attention_configs.json
(benchmarks/gpu_suite.sh --tune). Entries of other archs, and entries left when --budget-s runs out,
keep their configs.

Kinds time what they change: fwd and decode the forward op; dkdv and dq the deterministic backward op,
dkdv_atomic the atomic one (the other kernels of the op keep the table's configs).

--space (offline, CPU): the tuning space of each 16-bit entry (fp32 keeps its one config) is the
entry's config, the anchors' configs of its kind (FlashAttention-3, Triton's tutorial:
kernels/attention.py, AOT_ANCHORS) and its one-step neighbours; each is compiled for the entry's arch
(kernels/compile.py's machinery, representative builds: bf16 with kv_start, causal and not, and the
same without kv_start except decode; decode into fp32 partials, the causal one over a whole cache)
and kept when all compile without spills, fit shared memory, use wgmma where required without ptxas
serializing it and, in the sm_90 forward, keep the next QKᵀ in flight. The fp16 variants are
compiled by python -m kernels.compile once a candidate is in use: run it after a retune. --intersect
keeps only candidates already in the table that also compile here: run --space under one Triton
version and --space --intersect under the other.

--toy: the CPU path under TRITON_INTERPRET=1 (gpu_suite.sh --dry-run): fwd and dkdv at D=64, the first
two candidates, tiny fp16 shapes, wall-clock timing; it never rewrites the committed table.
"""
import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import results_dir, time_ms, write_csv  # noqa: E402
from engine import reference  # noqa: E402
from kernels import attention as attn  # noqa: E402

# --space gives every 16-bit entry a space. fp32 entries keep one candidate: on a GPU fp32 attention is
# the exact path (ieee dots on CUDA cores), not a fast one; its configs are the largest clean tiles.
# A GPU times GPT-2's and Llama's head dims first, so a tight --budget-s still covers them.
FIRST_HEAD_DIMS = (64, 128)
MAX_CANDIDATES = 8
# The anchors' configs per kind, [BLOCK_M, BLOCK_N, warps, stages] (AOT_ANCHORS says where each is
# read): FA3's sm90 forward 128x128 (2 stages; its 12 warps are not a Triton option, 8 are), the
# tutorial's 64/128 x 64/128 forward and its 32x128 dK/dV and 128x32 dQ (w4 s5); FA3's 64x128 dK/dV.
ANCHORS = {
    "fwd": ([128, 128, 8, 2], [128, 128, 8, 3], [64, 64, 4, 3]),
    "decode": (),  # FA3 decides the split, not the tile: decode tiles are our 16 rows, neighbours only
    "dkdv": ([64, 128, 8, 2], [32, 128, 4, 5]),
    "dkdv_atomic": ([64, 128, 8, 2], [32, 128, 4, 5]),
    "dq": ([128, 32, 4, 5], [128, 64, 8, 3]),
}
# Shapes (B, H, S or cache length, Sq). Check: ragged (partial tiles, decode split), small enough for the
# fp32 reference. Time: 16k tokens with H·D = 2048 (benchmarks/attention.py's training shapes); decode one
# query over an 8k cache at batch 1.
CHECK = {"train": (2, 3, 777, None), "decode": (1, 3, 3001, 1)}
TIME = {"train": (4, None, 4096, None), "decode": (1, None, 8192, 1)}
TOY = {"train": (1, 2, 40, None), "decode": (1, 2, 300, 1)}
# max |err| / max |reference|: rounding gives ~1e-2 in bf16 (dQ, dK the most), a wrong tile or mask ~1
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-4}
CSV_FIELDS = ("arch", "kind", "dtype", "head_dim", "block_m", "block_n", "num_warps", "num_stages", "shipped",
              "correct", "max_err", "ms", "winner", "note")


# ----------------------------------------------------------------------------- the table


def read_table(path: Path) -> dict:
    """The table's JSON document, after kernels/attention.py's loader has checked it."""
    attn.load_configs(path)
    return json.loads(Path(path).read_text())


def dumps_table(doc: dict) -> str:
    """The document as JSON with one entry (and one note) per line, so a retune reads as a small diff."""
    def value(v):
        return "[\n" + ",\n".join(f"    {json.dumps(x)}" for x in v) + "\n  ]" if isinstance(v, list) else json.dumps(v)
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {value(v)}" for k, v in doc.items()) + "\n}\n"


def key(e: dict) -> tuple:
    return tuple(e[f] for f in attn._KEY_FIELDS)


def config(e: dict) -> list[int]:
    return [e[f] for f in attn._CONFIG_FIELDS]


def winner(rows: list[dict]) -> list[int] | None:
    """The fastest candidate whose check passed (rows: candidate, correct, ms); None when none passed."""
    good = [r for r in rows if r["correct"] and r["ms"] is not None and math.isfinite(r["ms"])]
    return min(good, key=lambda r: r["ms"])["candidate"] if good else None


def rewrite(doc: dict, winners: dict, source: str) -> dict:
    """A copy of doc with each entry whose key is in winners set to its winner (and source), the
    winner moved to the front of its candidates; the winner must be one of them."""
    doc = copy.deepcopy(doc)
    for e in doc["entries"]:
        if (w := winners.get(key(e))) is not None:
            if w not in e.get("candidates", [config(e)]):
                raise ValueError(f"winner {w} of {key(e)} is not one of its candidates {e.get('candidates')}")
            e.update(zip(attn._CONFIG_FIELDS, w), source=source)
            e["candidates"] = [w] + [c for c in e["candidates"] if c != w]
    return doc


@contextlib.contextmanager
def trying(arch: int, kind: str, half: bool, d: int, c: list[int]):
    """The launchers pick config c for this entry while inside (the table's is restored after)."""
    per_d = attn._CONFIGS[(arch, kind, half)]
    saved, per_d[d] = per_d[d], attn.Config(*c)
    try:
        yield
    finally:
        per_d[d] = saved


# ----------------------------------------------------------------------------- the space, offline


def space(e: dict) -> list[list[int]]:
    """The entry's config, its kind's anchors and its one-step neighbours (BLOCK_N halved and doubled,
    warps 4 <-> 8, one stage more and fewer; decode keeps its 16-row tiles), valid ones, first 8."""
    if e["dtype"] != "16-bit":
        return [config(e)]
    bm, bn, w, s = config(e)
    found = [config(e), *map(list, ANCHORS[e["kind"]]), [bm, bn // 2, w, s], [bm, bn * 2, w, s],
             [bm, bn, 12 - w if w in (4, 8) else w, s], [bm, bn, w, s + 1], [bm, bn, w, s - 1]]
    if e["kind"] == "decode":
        found = [c for c in found if c[0] == bm]
    out = []
    for c in found:
        if c not in out and not attn.config_problem(c):
            out.append(c)
    return out[:MAX_CANDIDATES]


_KERNEL = {"fwd": attn._attn_fwd, "decode": attn._attn_fwd, "dkdv": attn._attn_bwd_dkdv,
           "dkdv_atomic": attn._attn_bwd_dkdv, "dq": attn._attn_bwd_dq}


def representative_builds(e: dict, c: list[int]) -> list[dict]:
    """kernels/compile.py's builds of entry e with config c that hold the most live state: bf16 (or fp32)
    with kv_start, causal and not; decode at batch 1 into fp32 partials, the causal one over a whole
    cache (kv_lens); the others also without kv_start, whose unmasked key (query) tiles get a loop of
    their own (on sm_90 the forward's is the overlapped one; there ptxas must not serialize any wgmma:
    compile_one's checks)."""
    paddings = (True,) if e["kind"] == "decode" else (True, False)
    return [_build(e, c, causal, padded) for padded in paddings for causal in (True, False)]


def _build(e: dict, c: list[int], causal: bool, padded: bool) -> dict:
    arch, kind, half, d = e["arch"], e["kind"], attn.DTYPE_CLASSES[e["dtype"]], e["head_dim"]
    dtype = torch.bfloat16 if half else torch.float32
    b, h, sq, sk = (1, 12, 1, 4096) if kind == "decode" else (2, 12, 1024, 1024)
    q, do = (torch.empty(b, h, sq, d, dtype=dtype, device="meta") for _ in range(2))
    k, v = (torch.empty(b, h, sk, d, dtype=dtype, device="meta") for _ in range(2))
    kv_start = torch.zeros(b, dtype=torch.int64, device="meta")
    with trying(arch, kind, half, d, c):
        if kind in ("fwd", "decode"):
            kv_lens = kv_start if kind == "decode" and causal else None
            launches = attn._forward_launches(q, k, v, causal, 1.0, kv_start if padded else None, arch,
                                              attn._AOT_SMS[arch], kv_lens)[0]
        else:
            o, lse = q, torch.empty(b * h, sq, dtype=torch.float32, device="meta")
            launches = attn._backward_launches(do, q, k, v, o, lse, causal, 1.0, kv_start if padded else None,
                                               kind != "dkdv_atomic", arch)[0]
    (launch,) = [x for x in launches if x.kernel is _KERNEL[kind]]
    return {**attn._aot_entry(launch, arch, dtype, "decode" if kind == "decode" else "fwd"), "launches": [launch]}


def filter_space(doc: dict, archs, intersect: bool, jobs: int) -> tuple[dict, list[dict]]:
    """(doc with each entry's candidates = its space that compiles clean here, the compile rows). The
    entry's own config is always kept first: the AOT table (python -m kernels.compile) checks it in
    every variant."""
    doc = copy.deepcopy(doc)
    todo = []
    for e in doc["entries"]:
        if e["arch"] in archs:
            tried = [c for c in space(e) if c in e.get("candidates", [])] if intersect else space(e)
            todo += [(e, c, build) for c in tried if c != config(e) for build in representative_builds(e, c)]
            e["candidates"] = [config(e)]
    from kernels.compile import compile_builds  # imports triton's compiler: only here, offline

    rows = compile_builds([build for _, _, build in todo], jobs)
    failed = set()
    for (e, c, _), row in zip(todo, rows):
        row["entry"], row["candidate"] = key(e), c
        if row["status"] != "ok":
            failed.add((key(e), tuple(c)))
    for e, c, _ in todo:
        if (key(e), tuple(c)) not in failed and c not in e["candidates"]:
            e["candidates"].append(c)
    return doc, rows


# ----------------------------------------------------------------------------- measuring, on a GPU


def _inputs(shape, d, dtype, device, gen):
    """q, k, v, dO of shape (B, H or H·D = 2048, keys, queries or as many as keys)."""
    b, h, s, sq = shape
    h = h or 2048 // d
    return [torch.randn(b, h, n, d, generator=gen, device=device).to(dtype) for n in (sq or s, s, s, sq or s)]


def _op(kind, q, k, v, do):
    """A callable that runs `kind`'s kernel and returns the op's outputs: the forward (causal), or the
    backward variant of one forward run here (so only the backward is timed)."""
    if kind in ("fwd", "decode"):
        return lambda: (attn.flash_attention(q, k, v, causal=True),)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = attn.flash_attention(q, k, v, causal=True, deterministic=kind != "dkdv_atomic")
    return lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)


def _reference(kind, q, k, v, do):
    """What _op's callable returns, from engine/reference.py in fp32."""
    q, k, v, do = (t.float() for t in (q, k, v, do))
    if kind in ("fwd", "decode"):
        return (reference.attention(q, k, v, causal=True),)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(reference.attention(q, k, v, causal=True), (q, k, v), do)


def max_error(kind, q, k, v, do, outputs) -> float:
    """max |ours - reference| / max |reference|, the worst of the outputs."""
    ref = _reference(kind, q, k, v, do)
    return max(((a.float() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for a, r in zip(outputs, ref))


def measure(e: dict, c: list[int], device, dtype, shapes, timer) -> dict:
    """Check candidate c of entry e against the reference at the check shape; time it when it passes."""
    arch, kind, half, d = e["arch"], e["kind"], attn.DTYPE_CLASSES[e["dtype"]], e["head_dim"]
    group = "decode" if kind == "decode" else "train"
    gen = torch.Generator(device).manual_seed(0)  # on the device: the timed inputs are 100+ MB
    row = {"candidate": c, "correct": False, "max_err": None, "ms": None, "note": ""}
    with trying(arch, kind, half, d, c):
        try:
            check = _inputs(shapes["check"][group], d, dtype, device, gen)
            row["max_err"] = max_error(kind, *check, _op(kind, *check)())
            row["correct"] = row["max_err"] <= TOLERANCE[dtype]  # NaN fails too
            if row["correct"]:
                timed = _inputs(shapes["time"][group], d, dtype, device, gen)
                row["ms"] = timer(_op(kind, *timed))
            else:
                row["note"] = f"max error {row['max_err']:.3g} > {TOLERANCE[dtype]}"
        except Exception as err:  # a candidate that fails to compile or launch is a row, not the end
            row["note"] = f"{type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}"
    return row


def csv_rows(measured: dict) -> list[dict]:
    """Every candidate's figures (columns CSV_FIELDS): measured = {entry key: (entry, rows)}."""
    out = []
    for e, rows in measured.values():
        best = winner(rows)
        out += [{**dict(zip(attn._KEY_FIELDS, key(e))), **dict(zip(attn._CONFIG_FIELDS, r["candidate"])),
                 "shipped": r["candidate"] == config(e), "correct": r["correct"],
                 "max_err": "" if r["max_err"] is None else f"{r['max_err']:.3g}",
                 "ms": "" if r["ms"] is None else f"{r['ms']:.4g}", "winner": r["candidate"] == best,
                 "note": r["note"]} for r in rows]
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=attn.CONFIG_TABLE)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<hardware>-<date>)")
    parser.add_argument("--write", action="store_true", help="rewrite --table with the winners")
    parser.add_argument("--kinds", nargs="+", choices=attn.KINDS, default=None)
    parser.add_argument("--head-dims", nargs="+", type=int, choices=attn.HEAD_DIMS, default=None)
    parser.add_argument("--dtypes", nargs="+", choices=tuple(attn.DTYPE_CLASSES), default=None)
    parser.add_argument("--budget-s", type=float, default=None, help="start no entry after this many seconds")
    parser.add_argument("--toy", action="store_true", help="the CPU path under TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--space", action="store_true", help="offline: recompute the tuning space (compiles)")
    parser.add_argument("--intersect", action="store_true", help="with --space: keep only listed candidates")
    parser.add_argument("--arch", type=int, nargs="+", choices=attn.ARCHS, default=list(attn.ARCHS))
    parser.add_argument("--jobs", type=int, default=2, help="with --space: compile processes")
    args = parser.parse_args(argv)
    try:
        doc = read_table(args.table)
    except ValueError as err:
        parser.error(str(err))

    if args.space:
        doc, rows = filter_space(doc, args.arch, args.intersect, args.jobs)
        for r in rows:
            print(f"{r['arch']} {r['kernel']} {r['config']}: {r['status']} "
                  f"({r['regs']} regs, {r['spill']} B spilled, {r['smem']} B smem, {r['seconds']} s)")
        args.table.write_text(dumps_table(doc))
        print(f"{len(rows)} candidate builds, {sum(r['status'] == 'ok' for r in rows)} clean; "
              f"{sum(len(e['candidates']) - 1 for e in doc['entries'])} candidates kept; wrote {args.table}")
        return 0

    if args.toy:
        if args.write:
            parser.error("--toy times the CPU interpreter: it must not rewrite the committed table (drop --write)")
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            parser.error("--toy without a GPU runs under the Triton interpreter: set TRITON_INTERPRET=1")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype, shapes = torch.float16, {"check": TOY, "time": TOY}
        kinds, head_dims, dtypes, per_entry = args.kinds or ("fwd", "dkdv"), args.head_dims or (64,), ("16-bit",), 2
        timer = lambda fn: time_ms(fn, warmup=0, reps=1)  # noqa: E731
    else:
        if not torch.cuda.is_available():
            print("tune_attention: needs a CUDA GPU (torch.cuda.is_available() is False); --toy runs the CPU path "
                  "under TRITON_INTERPRET=1 at tiny sizes, --space computes the tuning space offline", file=sys.stderr)
            return 2
        device, dtype, shapes = "cuda", torch.bfloat16, {"check": CHECK, "time": TIME}
        kinds, head_dims, dtypes, per_entry = args.kinds or attn.KINDS, args.head_dims or attn.HEAD_DIMS, \
            args.dtypes or tuple(attn.DTYPE_CLASSES), MAX_CANDIDATES
        timer = lambda fn: time_ms(fn, warmup=5, reps=20)  # noqa: E731  (do_bench: ~25 + 100 ms per candidate)
    arch = attn._target(torch.device(device))[0]
    entries = [e for e in doc["entries"] if e["arch"] == arch and e["kind"] in kinds and e["head_dim"] in head_dims
               and e["dtype"] in dtypes and len(e.get("candidates", [])) > 1]
    entries.sort(key=lambda e: e["head_dim"] not in FIRST_HEAD_DIMS)  # (stable: table order otherwise)
    out = results_dir(args.out)
    measured, start = {}, time.monotonic()
    print(f"tune_attention: sm_{arch}, {len(entries)} entries with a tuning space, results in {out}")
    for e in entries:
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            print(f"budget of {args.budget_s} s spent: {len(entries) - len(measured)} entries keep their configs")
            break
        e_dtype = dtype if e["dtype"] == "16-bit" else torch.float32
        rows = [measure(e, c, device, e_dtype, shapes, timer) for c in e["candidates"][:per_entry]]
        measured[key(e)] = (e, rows)
        write_csv(csv_rows(measured), out / "attention_tuning.csv")  # after every entry: a capped run keeps what it measured
        shipped = rows[0]["ms"] if rows[0]["candidate"] == config(e) else None
        best = winner(rows)
        best_ms = next((r["ms"] for r in rows if r["candidate"] == best), None)
        print(f"sm_{arch} {e['kind']} {e['dtype']} D={e['head_dim']}: "
              + "; ".join(f"{r['candidate']} " + (f"{r['ms']:.4g} ms" if r["correct"] else "wrong") for r in rows)
              + f" -> {best}" + (f" ({shipped / best_ms:.3g}x the shipped)" if shipped and best_ms else ""))
    where = "CPU interpreter (toy)" if args.toy else torch.cuda.get_device_name()
    source = f"measured on {where}, {datetime.date.today().isoformat()}, triton {__import__('triton').__version__}"
    new = rewrite(doc, {k: winner(rows) for k, (e, rows) in measured.items()}, source)
    (out / "attention_configs.json").write_text(dumps_table(new))
    if args.write:
        args.table.write_text(dumps_table(new))
    print(f"wrote {out / 'attention_tuning.csv'}, {out / 'attention_configs.json'}"
          + (f" and {args.table}" if args.write else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
