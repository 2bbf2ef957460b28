#!/usr/bin/env bash
# Every GPU target measured from a bare checkout, each part one call of under 8 minutes on one H100/H200:
#   bash benchmarks/gpu_suite.sh [--part core|extended|all | --tune] [--dry-run] [OUT_DIR]
#
# --part core (the default): the CUDA tests (JUnit report), then roofline, layernorm, attention,
#   train ("gpt2", every backend), generate ("gpt2", ours vs Hugging Face) and a short profile.
# --part extended: the targets of later issues: GQA attention (benchmarks/attention.py --gqa), then
#   fused loss (benchmarks/loss.py), compiled decode, Llama-shaped training step; a step whose issue has
#   not landed says "not landed". Its tuning step runs only with --tune (or in a dry run).
# --tune: the extended part's tuning step alone, a call of its own (steps-tune.csv): every candidate of
#   the attention launch-config table's tuning space (kernels/attention_configs.json) for this GPU's arch
#   checked and timed (benchmarks/tune_attention.py), the table rewritten with the fastest correct ones.
#   Commit the rewritten table after `python -m kernels.compile` shows its builds clean.
# --dry-run: every step of both parts (or of --part) at toy size on the CPU, under the Triton
#   interpreter, into a temporary folder unless OUT_DIR is given: proves the suite itself runs.
#
# Before the steps: the Python whose torch sees CUDA (the first of .venv/bin/python, $PYTHON,
# python3, python; in a dry run the first with torch), the C++ sampler built in place (the suite
# stops if it cannot be built: generate must not time the reference sampler instead), and Liger
# Kernel from the wheels in ./.whl when there are any (pip, offline, into a temporary folder).
# PYTHONPATH starts with the repository root, so nothing needs installing. Each step is its own
# process with a time cap (a step that runs over is stopped and marked, the rest still run), its
# output in OUT/<step>.log. Results: benchmarks/results/<gpu>-<date>/ (or OUT_DIR): CSVs, PNGs,
# logs, steps-<part>.csv, summary.md and targets.md (benchmarks/targets.py), the table of every
# target, printed last. Exit status 0 when every step ended ok (or has not landed yet), else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PART="" DRY_RUN=0 OUT="" TUNE=0
while [ $# -gt 0 ]; do
    case $1 in
        --part) PART=${2:-none}; shift $(($# > 1 ? 2 : 1)) ;;
        --dry-run) DRY_RUN=1; shift ;;
        --tune) TUNE=1; shift ;;
        -h|--help) sed -n '2,/^set -uo/{/^set -uo/d; s/^# \{0,1\}//; p}' "$0"; exit 0 ;;
        -*) echo "gpu_suite: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUT=$1; shift ;;
    esac
done
if [ $TUNE = 1 ] && [ -n "$PART" ]; then
    echo "gpu_suite: --tune runs the tuning step alone (a part of its own): drop --part $PART" >&2; exit 2
elif [ $TUNE = 1 ]; then PART=tune; fi
if [ -z "$PART" ]; then PART=$([ $DRY_RUN = 1 ] && echo all || echo core); fi
case $PART in core|extended|all|tune) ;; *) echo "gpu_suite: --part takes core, extended or all, not '$PART'" >&2; exit 2 ;; esac

# ----------------------------------------------------------------------------- Python, sampler, Liger

if [ $DRY_RUN = 1 ]; then NEEDS="import torch"; else NEEDS="import sys, torch; sys.exit(not torch.cuda.is_available())"; fi
PY=""
for candidate in .venv/bin/python ${PYTHON:-} python3 python; do
    if command -v "$candidate" > /dev/null && "$candidate" -c "$NEEDS" 2> /dev/null; then PY=$candidate; break; fi
done
if [ -z "$PY" ] && [ $DRY_RUN = 1 ]; then
    echo "gpu_suite: no Python with torch among .venv/bin/python, \$PYTHON, python3, python" >&2
    exit 1
elif [ -z "$PY" ]; then
    echo "gpu_suite: no CUDA GPU visible to any of .venv/bin/python, \$PYTHON, python3, python (no torch," \
        "or torch.cuda.is_available() is False); --dry-run runs the suite at toy size on the CPU" >&2
    exit 1
fi

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ $DRY_RUN = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # the CPU, even on a machine with a GPU
    OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite-dry-run.XXXXXX")}
fi
OUT=${OUT:-$("$PY" -c "from benchmarks.common import results_dir; print(results_dir())")}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
echo "gpu_suite: part $PART$([ $DRY_RUN = 1 ] && echo ', dry run'), $PY, results in $OUT"
FAILED=0

# record NAME OUTCOME SECONDS NOTE: one line of the current part's steps-<part>.csv, echoed.
record() {
    printf '%s,%s,%s,"%s"\n' "$1" "$2" "$3" "$4" >> "$STEPS"
    echo "- $1: $2${4:+ ($4)}, $3 s"
}
begin_part() {  # begin_part NAME: later records go to OUT/steps-NAME.csv
    STEPS=$OUT/steps-$1.csv
    echo "step,outcome,seconds,note" > "$STEPS"
}

begin_part setup
start=$SECONDS
if timeout 120 "$PY" setup.py build_ext --inplace --parallel 4 > "$OUT/build_sampler.log" 2>&1 &&
    "$PY" -c "import engine._sampler" >> "$OUT/build_sampler.log" 2>&1; then
    record build_sampler ok $((SECONDS - start)) ""
else
    echo "gpu_suite: could not build the C++ sampler (engine._sampler) with $PY, so generate would time the" \
        "reference sampler instead; stopping. The end of $OUT/build_sampler.log:" >&2
    tail -n 25 "$OUT/build_sampler.log" >&2
    exit 1
fi

start=$SECONDS
if compgen -G ".whl/*.whl" > /dev/null; then
    WHEELS=$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite-wheels.XXXXXX")
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WHEELS" .whl/*.whl > "$OUT/liger.log" 2>&1 &&
        PYTHONPATH=$PYTHONPATH:$WHEELS "$PY" -c "import liger_kernel" >> "$OUT/liger.log" 2>&1; then
        export PYTHONPATH=$PYTHONPATH:$WHEELS
        record liger ok $((SECONDS - start)) "$(cd .whl && ls liger_kernel-*.whl)"
    else
        record liger failed $((SECONDS - start)) "see liger.log"
        FAILED=$((FAILED + 1))
    fi
else
    record liger "not installed" 0 "no wheel in .whl"
fi

# ----------------------------------------------------------------------------- steps

DRY_RUN_CAP=300  # in a dry run every step gets this cap: toy sizes on a CPU keep their own pace

# step NAME CAP COMMAND...: run COMMAND, output in OUT/NAME.log, stopped after CAP seconds.
step() {
    local name=$1 cap=$2 start=$SECONDS rc outcome=ok note=""
    shift 2
    if [ $DRY_RUN = 1 ]; then cap=$DRY_RUN_CAP; fi
    echo "[$name] running (cap $cap s) ..."
    timeout --signal=INT --kill-after=5 "$cap" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then outcome="timed out"; note="cap $cap s"
    elif [ $rc -ne 0 ]; then outcome=failed; note="exit $rc, see $name.log"; fi
    if [ $outcome != ok ]; then FAILED=$((FAILED + 1)); fi
    record "$name" "$outcome" $((SECONDS - start)) "$note"
}

# not_landed NAME ISSUE: the step of a target a later issue adds; when it lands, this line becomes a `step` line.
not_landed() {
    record "$1" "not landed" 0 "issue $2"
}

if [ $DRY_RUN = 1 ]; then
    TOY=(--toy)
    TRAIN=(--toy --backends torch,triton)  # torch.compile (inductor) would spend the CPU's minutes building C++
    LLAMA_TRAIN=(--toy --backends triton,hf)
    GENERATE=(--toy)
    COMPILED_DECODE=(--toy)
    PROFILE=(--preset tiny --mode train --steps 2 --batch-size 2 --seq-len 16 --device cpu)
else
    TOY=()
    TRAIN=(--steps 10 --budget-s 5)
    LLAMA_TRAIN=(--seq-len 2048 --batch-size 4 --backends triton,hf --steps 10 --budget-s 5)  # ~20 GB of weights + AdamW
    GENERATE=(--new-tokens 64 --reps 2)
    COMPILED_DECODE=(--new-tokens 128 --reps 2)
    PROFILE=(--preset gpt2 --mode train --steps 3 --batch-size 8)
fi
PROFILE_DIR=${TMPDIR:-/tmp}/llm-engine-profile  # the trace is tens of MB: kept out of the results

# The caps add up to 425 s: with the sampler build, Python starts and the tables, under 8 minutes on an H100/H200.
core() {
    step cuda_tests 60 "$PY" -m pytest -m cuda -q tests --junitxml="$OUT/cuda_tests.xml"
    step roofline 15 "$PY" benchmarks/roofline.py "${TOY[@]}" --out "$OUT"
    step layernorm 35 "$PY" benchmarks/layernorm.py "${TOY[@]}" --out "$OUT"
    step attention 135 "$PY" benchmarks/attention.py "${TOY[@]}" --out "$OUT"
    step train 105 "$PY" benchmarks/train.py "${TRAIN[@]}" --out "$OUT"
    step generate 55 "$PY" benchmarks/generate.py "${GENERATE[@]}" --out "$OUT"
    step profile 20 "$PY" -m engine profile "${PROFILE[@]}" --out "$PROFILE_DIR"

    # The kernels' own summaries (their scripts print them), as markdown for summary.md.
    {
        echo "## CUDA tests"; echo; echo '```'; tail -n 3 "$OUT/cuda_tests.log"; echo '```'; echo
        echo "## Attention: ours against the best SDPA backend"; echo; echo '```'
        grep "the best SDPA backend" "$OUT/attention.log" || echo "(no summary: see attention.log)"
        echo '```'; echo
        echo "## LayerNorm: ours as a share of a copy, and against the others"; echo; echo '```'
        grep "of copy" "$OUT/layernorm.log" || echo "(no summary: see layernorm.log)"
        echo '```'; echo
        echo "## Profile: ${PROFILE[*]}, top-15 kernels"; echo; echo '```'
        sed -n '/ms .*calls/,/^wrote/p' "$OUT/profile.log" | head -n 17
        echo '```'
    } > "$OUT/kernels.md"
    "$PY" benchmarks/roofline.py --annotate "$OUT" > /dev/null 2>&1 || echo "roofline --annotate failed" >&2
}

# The extended part's landed caps add up to 510 s.
extended() {
    # attention_gqa.csv: H=32 over Hkv=8, D=128 (Llama-3-8B) against SDPA with enable_gqa; the first
    # call of each of our kernels JIT-compiles it (about 30 s of the cap)
    step gqa 120 "$PY" benchmarks/attention.py "${TOY[@]}" --gqa --out "$OUT"
    # loss.csv: fused linear + cross-entropy against eager, chunked torch and Liger, forward +
    # backward, peak memory and time, 16k tokens at V=128k, C=2048 and GPT-2's head, bf16
    step fused_loss 60 "$PY" benchmarks/loss.py "${TOY[@]}" --out "$OUT"
    # generate_compiled.csv: gpt2 batch-1 greedy decode, ours from one CUDA graph (compile=True, the draw
    # on the device, the prefill compiled by inductor) against HF generate and HF with a static cache
    # under torch.compile (reduce-overhead); the compiles and the capture are paid in the warm-up repetition
    step compiled_decode 150 "$PY" benchmarks/generate.py "${COMPILED_DECODE[@]}" --compile --batches 1 --modes greedy \
        --name generate_compiled --out "$OUT"
    # train_llama.csv: a llama-3.2-1b-shaped training step (16 layers, 2048 wide, GQA 32/8, V=128k),
    # ours (triton) against HF's LlamaForCausalLM with SDPA from the same weights
    step llama_train 180 "$PY" benchmarks/train.py --preset llama-3.2-1b "${LLAMA_TRAIN[@]}" --name train_llama --out "$OUT"
    if [ $DRY_RUN = 1 ]; then tune; else record tuning "not run" 0 "a call of its own: gpu_suite.sh --tune"; fi
}

# attention_tuning.csv (each candidate: correct or not, ms) and attention_configs.json (the table with the
# winners) in OUT; on a GPU also kernels/attention_configs.json rewritten. Entries are started within
# --budget-s; the ones left keep their configs (sm_90: 44 candidates in 10 entries, 16-bit D=64 and 128).
tune() {
    if [ $DRY_RUN = 1 ]; then
        step tuning 300 "$PY" benchmarks/tune_attention.py --toy --out "$OUT"
    else
        step tuning 420 "$PY" benchmarks/tune_attention.py --write --budget-s 330 --out "$OUT"
    fi
}

for part in core extended tune; do
    if [ $PART = $part ] || { [ $PART = all ] && [ $part != tune ]; }; then
        begin_part $part
        part_start=$SECONDS
        $part
        record "part $part" done $((SECONDS - part_start)) ""
    fi
done

# ----------------------------------------------------------------------------- tables

"$PY" benchmarks/targets.py "$OUT" $([ $DRY_RUN = 1 ] && echo --dry-run) > /dev/null || FAILED=$((FAILED + 1))
"$PY" - "$OUT" "$PART" "$DRY_RUN" <<'EOF' || FAILED=$((FAILED + 1))
import datetime, platform, subprocess, sys
from pathlib import Path

import torch
import triton

from benchmarks.common import write_summary
from benchmarks.targets import Run

out, part, dry_run = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
device = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if torch.cuda.is_available() else "CPU (dry run)"
notes = [
    f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit or 'unknown'}, "
    f"`bash benchmarks/gpu_suite.sh --part {part}{' --dry-run' if dry_run else ''}`",
    f"{device}, torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}",
    *[f"{s.name}: {s.outcome}{f' ({s.note})' if s.note else ''}, {s.seconds} s" for s in Run(out).steps.values()],
]
title = "GPU benchmark suite" + (" (dry run: toy sizes on the CPU)" if dry_run else "")
write_summary(out, title, notes, ["targets", "roofline", "roofline_share", "train", "generate", "kernels"])
EOF
echo "wrote $OUT/summary.md"
echo
cat "$OUT/targets.md"
[ $FAILED -eq 0 ]
