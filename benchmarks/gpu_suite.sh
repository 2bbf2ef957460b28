#!/usr/bin/env bash
# The GPU half of the benchmarks in one call, under 8 minutes on one H100 / H200:
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
# CUDA tests, then roofline, layernorm, attention, train ("gpt2", every backend), generate
# ("gpt2", ours vs Hugging Face) and a short `llm-engine profile`, each as its own process with a
# time cap (a step that runs over is stopped and marked, the rest still run). Everything lands in
# benchmarks/results/<gpu>-<date>/ (or OUT_DIR): CSVs, PNGs, one .log per step and summary.md,
# which is printed last. Uses .venv/bin/python when the repository has one, else $PYTHON or python.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python}; fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: no CUDA GPU visible to $PY (torch.cuda.is_available() is False)" >&2
    exit 1
fi
OUT=${1:-$($PY -c "from benchmarks.common import results_dir; print(results_dir())")}
mkdir -p "$OUT"
STATUS="$OUT/status.md"
: > "$STATUS"
SUITE_START=$SECONDS

# step NAME CAP_SECONDS COMMAND...: run with output in $OUT/NAME.log, record how it ended.
step() {
    local name=$1 cap=$2 start=$SECONDS rc
    shift 2
    echo "[$name] running (cap ${cap} s) ..."
    timeout --signal=INT --kill-after=15 "$cap" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - start)) how="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then how="timed out after ${cap} s"
    elif [ $rc -ne 0 ]; then how="failed (exit $rc, see $name.log)"; fi
    echo "- $name: $how, ${took} s" | tee -a "$STATUS"
}

step cuda_tests 50 $PY -m pytest -m cuda -q tests
step roofline 20 $PY benchmarks/roofline.py --out "$OUT"
step layernorm 40 $PY benchmarks/layernorm.py --out "$OUT"
step attention 150 $PY benchmarks/attention.py --out "$OUT"
step train 120 $PY benchmarks/train.py --out "$OUT" --steps 10 --budget-s 5
step generate 70 $PY benchmarks/generate.py --out "$OUT" --new-tokens 64 --reps 2
PROFILE_DIR=${TMPDIR:-/tmp}/llm-engine-profile  # the trace is tens of MB: kept out of the results
step profile 30 $PY -m engine profile --preset gpt2 --mode train --steps 3 --batch-size 8 --out "$PROFILE_DIR"

# The kernels' own summaries (their scripts print them), as markdown for summary.md.
{
    echo "## CUDA tests"; echo; echo '```'; tail -n 3 "$OUT/cuda_tests.log"; echo '```'; echo
    echo "## Attention: ours against the best SDPA backend"; echo; echo '```'
    grep "the best SDPA backend" "$OUT/attention.log" || echo "(no summary: see attention.log)"
    echo '```'; echo
    echo "## LayerNorm: ours as a share of a copy, and against the others"; echo; echo '```'
    grep "of copy" "$OUT/layernorm.log" || echo "(no summary: see layernorm.log)"
    echo '```'; echo
    echo "## Profile: gpt2, 3 training steps of batch 8, top-15 kernels"; echo; echo '```'
    sed -n '/ms .*calls/,/^wrote/p' "$OUT/profile.log" | head -n 17
    echo '```'
} > "$OUT/kernels.md"
$PY benchmarks/roofline.py --annotate "$OUT" > /dev/null 2>&1 || echo "- roofline shares: failed" >> "$STATUS"
echo "- whole suite: $((SECONDS - SUITE_START)) s" >> "$STATUS"

$PY - "$OUT" <<'EOF'
import datetime, platform, subprocess, sys
from pathlib import Path

import torch

from benchmarks.common import write_summary

out = Path(sys.argv[1])
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
notes = [
    f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit or 'unknown'}, `bash benchmarks/gpu_suite.sh`",
    f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
    f"triton {__import__('triton').__version__}, Python {platform.python_version()}",
    *[line.removeprefix("- ") for line in (out / "status.md").read_text().splitlines()],
]
write_summary(out, "GPU benchmark suite", notes, ["roofline", "roofline_share", "train", "generate", "kernels"])
EOF
echo
cat "$OUT/summary.md"
