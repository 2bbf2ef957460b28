"""The GPU targets table — target | measured | goal | pass/fail — from a results folder.

    python benchmarks/targets.py DIR [--dry-run]

benchmarks/gpu_suite.sh runs this last. It reads what the suite left in DIR: how each step ended
(steps-setup.csv, steps-core.csv, steps-extended.csv, steps-tune.csv), attention.csv, attention_tuning.csv, attention_gqa.csv, layernorm.csv, train.csv, train_llama.csv,
loss.csv, generate.csv and the CUDA tests' JUnit report (cuda_tests.xml); it writes DIR/targets.md and prints it.

A target over several shapes is judged by its worst shape: the lowest figure for an "at least"
goal, the highest for an "at most" goal, over every shape the target names that the run measured;
the measured column says which shape that was. A target with no figure says why: its step timed
out, failed, did not run, has not landed yet, Liger was not installed, or the CSV holds no row of
its shapes. Rows a step wrote before it timed out still count, marked "partial".
--dry-run (the suite's CPU dry run): the CSVs hold toy shapes, so the shape filters are dropped
and the table is headed as a dry run; its figures and verdicts check the code path, nothing else.
"""
import argparse
import csv
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


class NotMeasured(Exception):
    """No figure for a target; the message says why."""


# ----------------------------------------------------------------------------- what a run left


@dataclass(frozen=True)
class Step:
    """One line of steps-<part>.csv: how a step of the suite ended."""

    name: str
    outcome: str  # ok | failed | timed out | not landed | not installed | not run
    seconds: str
    note: str

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def why(self) -> str:
        return {"failed": f"{self.name} step failed ({self.note})",
                "timed out": f"{self.name} step timed out after {self.seconds} s",
                "not landed": f"{self.note} has not landed",
                "not run": f"{self.name} step not run ({self.note})",
                "not installed": f"{self.name} not installed ({self.note})"}.get(self.outcome, f"{self.name}: {self.outcome}")


class Run:
    """A results folder: the steps' outcomes, CSVs and JUnit report, read on first use."""

    def __init__(self, folder: Path, dry_run: bool = False):
        self.folder, self.dry_run = Path(folder), dry_run
        self.steps = {}
        for part in ("setup", "core", "extended", "tune"):
            path = self.folder / f"steps-{part}.csv"
            for row in read_csv(path) if path.is_file() else []:
                self.steps[row["step"]] = Step(row["step"], row["outcome"], row["seconds"], row["note"])

    def rows(self, name: str, of_shapes=lambda row: True) -> list[dict]:
        """The rows of DIR/name of the target's shapes (every row in a dry run: toy shapes)."""
        path = self.folder / name
        rows = read_csv(path) if path.is_file() else []
        return rows if self.dry_run else [r for r in rows if of_shapes(r)]

    def tests(self) -> dict[str, tuple[str, str]]:
        """cuda_tests.xml as {test id: (passed | failed | skipped, message)}."""
        path = self.folder / "cuda_tests.xml"
        if not path.is_file():
            return {}
        found = {}
        for case in ET.parse(path).iter("testcase"):
            test_id = f"{case.get('classname')}::{case.get('name')}"
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            skip = case.find("skipped")
            if bad is not None:
                found[test_id] = (FAILED, bad.get("message", ""))
            elif skip is not None:
                found[test_id] = (SKIPPED, skip.get("message", ""))
            else:
                found[test_id] = (PASSED, "")
        return found


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- goals


@dataclass(frozen=True)
class AtLeast:
    """figure >= bound at every shape (judged on the lowest); AtMost is the mirror image."""

    bound: float
    unit: str = "x"
    at_least = True

    def __str__(self) -> str:
        return f"{'≥' if self.at_least else '≤'} {self.bound:g}{self.unit}"

    def judge(self, figures: dict[str, float]) -> tuple[str, bool]:
        worst = min if self.at_least else max
        shape, value = worst(figures.items(), key=lambda item: item[1])
        where = f"worst of {len(figures)}: {shape}" if len(figures) > 1 else shape
        met = value >= self.bound if self.at_least else value <= self.bound
        return f"{value:.3g}{self.unit} ({where})", met


class AtMost(AtLeast):
    at_least = False


class AllPass:
    """Every test that ran passed (figures: {test id: passed?})."""

    def __str__(self) -> str:
        return "all pass"

    def judge(self, figures: dict[str, bool]) -> tuple[str, bool]:
        failed = [name.split("::")[-1] for name, ok in figures.items() if not ok]
        text = f"{len(figures) - len(failed)} of {len(figures)} passed"
        return (text + f"; failed: {', '.join(failed)}" if failed else text), not failed


# ----------------------------------------------------------------------------- figures per shape


def by_key(rows: list[dict], *columns: str) -> dict[tuple, dict[str, dict]]:
    """{(values of columns): {impl, provider or backend: row}}."""
    grouped = {}
    for r in rows:
        who = r.get("impl") or r.get("provider") or r.get("backend")
        grouped.setdefault(tuple(r.get(c, "") for c in columns), {})[who] = r
    return grouped


def best_sdpa(impls: dict[str, float]) -> float | None:
    times = [ms for name, ms in impls.items() if name.startswith("sdpa-")]
    return min(times) if times else None


ATTENTION_SHAPE = ("batch", "heads", "seqlen", "head_dim", "causal", "dtype")


def attention_label(key: tuple) -> str:
    batch, heads, seqlen, head_dim, causal, dtype = key
    return f"S={seqlen} D={head_dim} {'causal' if causal == 'True' else 'full'} {dtype}"


def long_causal_d128_bf16(r: dict) -> bool:
    return r["causal"] == "True" and r["head_dim"] == "128" and r["dtype"] == "bfloat16" and int(r["seqlen"]) >= 4096


def attention_ms(run: Run, mode: str, csv_name: str = "attention.csv",
                 of_shapes=long_causal_d128_bf16) -> dict[tuple, dict[str, float]]:
    rows = [r for r in run.rows(csv_name, of_shapes) if r["mode"] == mode and r["ms"]]
    return {key: {impl: float(r["ms"]) for impl, r in impls.items()} for key, impls in by_key(rows, *ATTENTION_SHAPE).items()}


def attention_forward_vs_sdpa(run: Run, csv_name: str = "attention.csv", of_shapes=long_causal_d128_bf16) -> dict[str, float]:
    figures = {}
    for key, ms in attention_ms(run, "fwd", csv_name, of_shapes).items():
        if "ours" in ms and best_sdpa(ms):
            figures[attention_label(key)] = best_sdpa(ms) / ms["ours"]
    return figures


def gqa_llama3_8b(r: dict) -> bool:
    """Llama-3-8B's attention: 32 query heads over 8 K/V heads of 128, bf16, long sequences."""
    return (r["heads"] == "32" and r["kv_heads"] == "8" and r["head_dim"] == "128" and r["dtype"] == "bfloat16"
            and int(r["seqlen"]) >= 4096)


def gqa_forward_vs_sdpa(run: Run) -> dict[str, float]:
    """attention_gqa.csv (benchmarks/attention.py --gqa): best SDPA (enable_gqa) / ours, forward."""
    return attention_forward_vs_sdpa(run, "attention_gqa.csv", gqa_llama3_8b)


def attention_forward_tflops(run: Run) -> dict[str, float]:
    rows = [r for r in run.rows("attention.csv", long_causal_d128_bf16) if r["mode"] == "fwd" and r["impl"] == "ours"]
    return {attention_label(tuple(r[c] for c in ATTENTION_SHAPE)): float(r["tflops"]) for r in rows if r["tflops"]}


def attention_backward_vs_sdpa(run: Run) -> dict[str, float]:
    """Backward time = forward+backward minus forward of the same implementation. Judged: "ours",
    the default (deterministic) backward; "ours-atomic" has no forward row, so it drops out."""
    forward, both = attention_ms(run, "fwd"), attention_ms(run, "fwd+bwd")
    figures = {}
    for key, ms in both.items():
        fwd = forward.get(key, {})
        backward = {impl: t - fwd[impl] for impl, t in ms.items() if impl in fwd}
        if "ours" in backward and best_sdpa(backward):
            figures[attention_label(key)] = best_sdpa(backward) / backward["ours"]
    return figures


def attention_decode_vs_sdpa(run: Run) -> dict[str, float]:
    """ours / best SDPA latency of one query over a 1k-32k cache (lower is better)."""
    rows = [r for r in run.rows("attention.csv", lambda r: 1024 <= int(r["cache"] or 0) <= 32768)
            if r["mode"] == "decode" and r["ms"]]
    figures = {}
    for (batch, cache), impls in by_key(rows, "batch", "cache").items():
        ms = {impl: float(r["ms"]) for impl, r in impls.items()}
        if "ours" in ms and best_sdpa(ms):
            figures[f"B={batch} cache={cache}"] = ms["ours"] / best_sdpa(ms)
    return figures


def layernorm_bf16_wide(r: dict) -> bool:
    return r["dtype"] == "bfloat16" and r["M"] == "32768" and int(r["N"]) >= 1024


def layernorm_forward_share_of_copy(run: Run) -> dict[str, float]:
    rows = run.rows("layernorm.csv", layernorm_bf16_wide)
    return {f"N={r['N']}": 100 * float(r["fraction of copy"]) for r in rows
            if r["mode"] == "forward" and r["provider"] == "triton"}


def layernorm_both_vs(other: str):
    def figures(run: Run) -> dict[str, float]:
        rows = [r for r in run.rows("layernorm.csv", layernorm_bf16_wide) if r["mode"] == "both"]
        if rows and not any(r["provider"] == other for r in rows):
            raise NotMeasured(f"no {other} rows in layernorm.csv")
        return {f"N={n}": float(p[other]["ms"]) / float(p["triton"]["ms"])
                for (n,), p in by_key(rows, "N").items() if "triton" in p and other in p}
    return figures


def loss_llama3_head(r: dict) -> bool:
    """loss.csv's target shape: 16k tokens, V=128k, C=2048, bf16."""
    return (r["N"], r["V"], r["C"], r["dtype"]) == ("16384", "131072", "2048", "bfloat16")


def fused_loss_memory_vs_eager(run: Run) -> dict[str, float]:
    """loss.csv (benchmarks/loss.py): fused / eager peak memory of forward + backward."""
    return {f"N={n} V={v} C={c}": float(p["fused"]["peak_mb"]) / float(p["eager"]["peak_mb"])
            for (n, v, c), p in by_key(run.rows("loss.csv", loss_llama3_head), "N", "V", "C").items()
            if "fused" in p and "eager" in p and p["fused"]["peak_mb"] and float(p["eager"]["peak_mb"] or 0) > 0}


def fused_loss_speed_vs_liger(run: Run) -> dict[str, float]:
    """loss.csv: Liger's / ours forward + backward time, same shape, same run."""
    rows = run.rows("loss.csv", loss_llama3_head)
    if rows and not any(r["provider"] == "liger" for r in rows):
        raise NotMeasured("no liger rows in loss.csv")
    return {f"N={n} V={v} C={c}": float(p["liger"]["ms"]) / float(p["fused"]["ms"])
            for (n, v, c), p in by_key(rows, "N", "V", "C").items() if "fused" in p and "liger" in p}


def gpt2_bf16(r: dict) -> bool:
    return r["preset"] == "gpt2" and r["dtype"] == "bf16-autocast"


def train_triton(run: Run) -> dict[tuple, dict[str, dict]]:
    rows = [r for r in run.rows("train.csv", gpt2_bf16) if r["tokens_per_s"]]
    return {key: p for key, p in by_key(rows, "preset", "batch", "seq_len").items() if "triton" in p}


LOSS_AGREEMENT = 1e-3  # the same weights and tokens: our first step's loss and HF's may differ by this much


def llama_train_vs_hf(run: Run) -> dict[str, float]:
    """train_llama.csv (benchmarks/train.py --preset llama-3.2-1b --backends triton,hf): our tokens/s
    over HF's. A shape whose first-step losses differ by more than LOSS_AGREEMENT trained something
    else: its figure is 0 (a fail), the gap named."""
    rows = [r for r in run.rows("train_llama.csv", lambda r: r["dtype"] == "bf16-autocast") if r["tokens_per_s"]]
    figures = {}
    for (preset, batch, seq_len), p in by_key(rows, "preset", "batch", "seq_len").items():
        if {"triton", "hf"} <= p.keys():
            gap = abs(float(p["triton"]["first_loss"]) - float(p["hf"]["first_loss"]))
            label = f"{preset} {batch}x{seq_len}"
            if gap > LOSS_AGREEMENT:
                figures[f"{label}, first losses {gap:.2g} apart"] = 0.0
            else:
                figures[label] = float(p["triton"]["tokens_per_s"]) / float(p["hf"]["tokens_per_s"])
    return figures


def train_mfu(run: Run) -> dict[str, float]:
    return {f"{preset} {batch}x{seq}": float(p["triton"]["mfu_pct"]) for (preset, batch, seq), p in train_triton(run).items()}


def train_vs_compile(run: Run) -> dict[str, float]:
    triton = train_triton(run)
    if triton and not any("torch.compile" in p for p in triton.values()):
        raise NotMeasured("no torch.compile figure in train.csv")
    return {f"{preset} {batch}x{seq}": float(p["triton"]["tokens_per_s"]) / float(p["torch.compile"]["tokens_per_s"])
            for (preset, batch, seq), p in triton.items() if "torch.compile" in p}


def decode_vs_hf(run: Run) -> dict[str, float]:
    """generate.csv at batch 1 (the suite runs preset gpt2; the CSV does not name it), every mode."""
    rows = [r for r in run.rows("generate.csv", lambda r: r["batch"] == "1") if r["decode_tok_s"]]
    return {f"{mode} B={batch}" + (f" threads={threads}" if threads else ""):
            float(p["ours"]["decode_tok_s"]) / float(p["hf"]["decode_tok_s"])
            for (mode, batch, threads), p in by_key(rows, "mode", "batch", "threads").items() if {"ours", "hf"} <= p.keys()}


def compiled_decode(run: Run, impl: str, baseline: str | None) -> dict[str, float]:
    """generate_compiled.csv (generate.py --compile, batch 1, greedy): impl's decode tok/s over
    baseline's, or with no baseline impl's share of copy bandwidth (%)."""
    rows = run.rows("generate_compiled.csv", lambda r: r["batch"] == "1" and r["mode"] == "greedy")
    by_impl = {r["impl"]: r for r in rows if r["decode_tok_s"]}
    if impl not in by_impl or (baseline and baseline not in by_impl):
        raise NotMeasured(f"no batch-1 greedy rows of {impl}" + (f" and {baseline}" if baseline else "") + " in generate_compiled.csv")
    if baseline is None:
        return {"B=1 greedy": float(by_impl[impl]["pct_of_copy_bw"])}
    return {"B=1 greedy": float(by_impl[impl]["decode_tok_s"]) / float(by_impl[baseline]["decode_tok_s"])}


def tuned_vs_shipped(run: Run) -> dict[str, float]:
    """attention_tuning.csv (benchmarks/tune_attention.py, gpu_suite.sh --tune): per tuned entry, the
    shipped config's ms over the winner's (the shipped config is a candidate: below 1 only when it failed
    its check, and then the entry has no figure)."""
    entries = {}
    for r in run.rows("attention_tuning.csv"):
        entries.setdefault(f"sm_{r['arch']} {r['kind']} {r['dtype']} D={r['head_dim']}", []).append(r)
    figures = {}
    for entry, rows in entries.items():
        shipped = [float(r["ms"]) for r in rows if r["shipped"] == "True" and r["ms"]]
        won = [float(r["ms"]) for r in rows if r["winner"] == "True" and r["ms"]]
        if shipped and won:
            figures[entry] = shipped[0] / won[0]
    return figures


def cuda_tests(run: Run, *words: str, about: tuple[str, ...] = ()) -> dict[str, bool]:
    """{test id: passed?} of the cuda tests that ran whose name holds one of `words` and whose
    id holds one of `about` (all tests when none are given)."""
    tests = run.tests()
    if not tests:
        raise NotMeasured("no cuda_tests.xml")
    chosen = {t: outcome for t, outcome in tests.items()
              if (not words or any(w in t.split("::")[-1] for w in words)) and (not about or any(a in t for a in about))}
    if not chosen:
        raise NotMeasured(f"no such cuda test among the {len(tests)} in cuda_tests.xml")
    ran = {t: status == PASSED for t, (status, _) in chosen.items() if status != SKIPPED}
    if not ran:
        reason = next(iter(chosen.values()))[1]
        raise NotMeasured(f"all {len(chosen)} skipped ({reason})")
    return ran


DETERMINISM = ("deterministic", "bitwise")

# ----------------------------------------------------------------------------- the targets


@dataclass(frozen=True)
class Target:
    name: str
    goal: AtLeast | AllPass
    steps: tuple[str, ...]  # the suite steps whose output it reads, first the one that measures
    figures: object = None  # fn(Run) -> {shape: figure}; None until its step has landed


CORE = [
    Target("attention forward vs the best SDPA backend (causal, D=128, bf16, S ≥ 4096)", AtLeast(1.0), ("attention",),
           attention_forward_vs_sdpa),
    Target("attention forward TFLOP/s (same shapes)", AtLeast(550, " TFLOP/s"), ("attention",), attention_forward_tflops),
    Target("attention backward vs the best SDPA backend (same shapes)", AtLeast(0.9), ("attention",),
           attention_backward_vs_sdpa),
    Target("decode attention latency vs the best SDPA backend (1 query, 1k-32k cache)", AtMost(1.2), ("attention",),
           attention_decode_vs_sdpa),
    Target("LayerNorm forward, share of copy bandwidth (bf16, M=32768, N ≥ 1024)", AtLeast(90, "%"), ("layernorm",),
           layernorm_forward_share_of_copy),
    Target("LayerNorm forward+backward vs torch (same shapes)", AtLeast(1.5), ("layernorm",), layernorm_both_vs("torch")),
    Target("LayerNorm forward+backward vs Liger (same shapes)", AtLeast(1.2), ("layernorm", "liger"),
           layernorm_both_vs("liger")),
    Target("gpt2 bf16 training MFU (triton backend)", AtLeast(45, "%"), ("train",), train_mfu),
    Target("gpt2 bf16 training tokens/s vs torch.compile", AtLeast(1.1), ("train",), train_vs_compile),
    Target("gpt2 batch-1 decode tokens/s vs HF generate", AtLeast(1.5), ("generate",), decode_vs_hf),
    Target("attention gradients bitwise equal over 3 runs (cuda tests)", AllPass(), ("cuda_tests",),
           lambda run: cuda_tests(run, *DETERMINISM, about=("attention",))),
    Target("LayerNorm gradients bitwise equal over 3 runs (cuda tests)", AllPass(), ("cuda_tests",),
           lambda run: cuda_tests(run, *DETERMINISM, about=("layernorm", "layer_norm"))),
    Target("all cuda tests pass", AllPass(), ("cuda_tests",), cuda_tests),
]

# Targets of later issues: "not measured: issue N has not landed" until that issue turns the step's
# `not_landed` line in gpu_suite.sh into a `step` line and gives its Target a figures function.
EXTENDED = [
    Target("GQA forward vs the best SDPA backend (H=32, Hkv=8, D=128, bf16, S ≥ 4096)", AtLeast(1.0), ("gqa",),
           gqa_forward_vs_sdpa),
    Target("fused linear cross-entropy peak memory vs eager (16k tokens, V=128k, C=2048, bf16)", AtMost(0.25),
           ("fused_loss",), fused_loss_memory_vs_eager),
    Target("fused linear cross-entropy speed vs Liger (same shape)", AtLeast(1.0), ("fused_loss", "liger"),
           fused_loss_speed_vs_liger),
    Target("compiled gpt2 batch-1 decode vs HF generate", AtLeast(1.5), ("compiled_decode",),
           lambda run: compiled_decode(run, "ours-graph", "hf")),
    Target("compiled gpt2 batch-1 decode vs compiled static-cache HF", AtLeast(1.0), ("compiled_decode",),
           lambda run: compiled_decode(run, "ours-graph", "hf-static-compiled")),
    Target("compiled gpt2 batch-1 decode, share of copy bandwidth", AtLeast(70, "%"), ("compiled_decode",),
           lambda run: compiled_decode(run, "ours-graph", None)),
    Target("llama-3.2-1b-shaped bf16 training step vs HF (SDPA) tokens/s, same first loss to 1e-3", AtLeast(1.2),
           ("llama_train",), llama_train_vs_hf),
    Target("tuned kernel configurations vs the shipped ones", AtLeast(1.0), ("tuning",), tuned_vs_shipped),
]
TARGETS = CORE + EXTENDED


def evaluate(target: Target, run: Run) -> tuple[str, str]:
    """(measured, verdict) of one target: verdict is pass, fail or not measured."""
    step_why = next((run.steps[s].why() if s in run.steps else f"{s} step not run"
                     for s in target.steps if s not in run.steps or not run.steps[s].ok), "")
    try:
        if target.figures is None:
            raise NotMeasured("no measurement of this target yet")
        figures = target.figures(run)
        if not figures:
            raise NotMeasured("no row of its shapes in the results")
    except NotMeasured as err:
        return f"not measured: {step_why or err}", "not measured"
    measured, met = target.goal.judge(figures)
    if step_why:
        measured += f"; partial: {step_why}"
    return measured, "pass" if met else "fail"


def table(run: Run) -> str:
    title = ("## GPU targets — dry run: toy shapes on the CPU, the figures and verdicts only show that every step "
             "and target computation runs" if run.dry_run else "## GPU targets")
    lines = [title, "", "| target | measured | goal | pass/fail |", "|---|---|---|---|"]
    verdicts = []
    for target in TARGETS:
        measured, verdict = evaluate(target, run)
        verdicts.append(verdict)
        lines.append(f"| {target.name} | {measured} | {target.goal} | {verdict} |")
    lines += ["", f"{verdicts.count('pass')} pass, {verdicts.count('fail')} fail, "
              f"{verdicts.count('not measured')} not measured. A target over several shapes is judged by its worst "
              "shape (named in the measured column)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="the results folder the suite wrote")
    ap.add_argument("--dry-run", action="store_true", help="toy shapes: drop the shape filters, head the table as a dry run")
    args = ap.parse_args(argv)
    text = table(Run(args.folder, args.dry_run))
    (args.folder / "targets.md").write_text(text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
