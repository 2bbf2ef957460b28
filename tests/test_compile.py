"""Every shipped kernel configuration compiles ahead of time for sm_80 and sm_90 (no GPU needed):
no register spills, shared memory within the arch's limit, wgmma in the Hopper matmul kernels.

The compile runs in a subprocess without TRITON_INTERPRET (other test modules set it, and the
interpreter replaces @triton.jit functions). Cold, it takes about 1.5-3 minutes on 2 cores;
with Triton's cache (~/.triton/cache) warm, seconds.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import compile as aot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "kernels.compile", "--json"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.stdout.strip(), out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_config_builds_for_both_archs(rows):
    configs = aot.collect_configs()
    expected = sorted((c["kernel"], f"sm_{a}", c["config"]) for c in configs for a in c["archs"])
    assert sorted((r["kernel"], r["arch"], r["config"]) for r in rows) == expected
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {c["kernel"].split("_")[0] for c in configs} >= {"attn", "ln"}  # both kernel modules listed


@pytest.mark.slow
def test_no_spills_smem_fits_and_wgmma(rows):
    wgmma = {(c["kernel"], c["config"]) for c in aot.collect_configs() if c["wgmma"]}
    assert wgmma, "no configuration requires wgmma"
    for r in rows:
        where = f"{r['kernel']} {r['arch']} {r['config']}: {r['status']}"
        assert r["regs"] is not None, where
        assert r["spill"] == 0, where
        assert r["smem"] <= aot.SMEM_LIMIT[int(r["arch"][3:])], where
        if r["arch"] == "sm_90" and (r["kernel"], r["config"]) in wgmma:
            assert r["wgmma"] > 0, where
        assert r["status"] == "ok", where


def test_table_formatting():
    row = {"kernel": "k", "arch": "sm_90", "config": "c", "regs": 32, "spill": 0, "smem": 0, "wgmma": None,
           "seconds": 0.1, "status": "ok"}
    lines = aot.format_table([row]).splitlines()
    assert lines[0].split() == list(aot.COLUMNS) and lines[2].split()[:6] == ["k", "sm_90", "c", "32", "0", "0"]
