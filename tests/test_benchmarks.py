"""Smoke runs of the benchmark scripts at toy size (their CSV columns and sane values), the
summary writer, and `llm-engine profile` on the CPU (a Chrome trace with our phases in it).
Speed is never checked here: that is what the benchmarks are for."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import write_summary

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args, timeout=240):
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path) as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_roofline_toy_writes_both_ceilings(tmp_path):
    from benchmarks.roofline import COLUMNS

    run_script("benchmarks/roofline.py", "--toy", "--out", str(tmp_path))
    columns, rows = read_csv(tmp_path / "roofline.csv")
    assert tuple(columns) == COLUMNS
    assert [r["metric"] for r in rows] == ["copy", "matmul"]
    assert all(float(r["value"]) > 0 and float(r["ms"]) > 0 for r in rows)


def test_roofline_annotate_quotes_kernels_as_share_of_peak(tmp_path):
    (tmp_path / "roofline.csv").write_text("metric,device,dtype,size,ms,value,unit\n"
                                           "copy,x,uint8,1 B,1,1000,GB/s\nmatmul,x,bfloat16,1x1x1,1,500,TFLOP/s\n")
    (tmp_path / "attention.csv").write_text(
        "mode,impl,batch,heads,seqlen,cache,head_dim,causal,dtype,ms,tflops\n"
        "fwd,ours,1,16,1024,,128,True,bfloat16,1,250\nfwd,ours,1,16,2048,,128,True,bfloat16,1,300\n"
        "fwd,sdpa-flash,1,16,2048,,128,True,bfloat16,1,400\n")
    (tmp_path / "layernorm.csv").write_text(
        "mode,N,M,dtype,provider,ms,GB/s,copy GB/s,fraction of copy\nforward,1024,1,bf16,triton,1,900,1000,0.9\n")
    run_script("benchmarks/roofline.py", "--annotate", str(tmp_path))
    text = (tmp_path / "roofline_share.md").read_text()
    assert "| attention | fwd D=128 causal, best S=2048 | 300.0 TFLOP/s | 60% |" in text
    assert "| layernorm | forward N=1024 | 900 GB/s | 90% |" in text
    assert "400" not in text  # SDPA rows are not ours


def test_train_toy_reports_every_backend(tmp_path):
    from benchmarks.train import COLUMNS

    out = run_script("benchmarks/train.py", "--toy", "--backends", "reference,torch,triton", "--out", str(tmp_path))
    columns, rows = read_csv(tmp_path / "train.csv")
    assert tuple(columns) == COLUMNS
    assert [r["backend"] for r in rows] == ["reference", "torch", "triton"], out
    for r in rows:
        assert float(r["tokens_per_s"]) > 0 and 0 < float(r["mfu_pct"]), r
        assert int(r["params"]) > 0 and r["peak_mem_mb"] != ""
    assert float(rows[1]["speedup_vs_torch"]) == 1.0
    assert "| triton |" in (tmp_path / "train.md").read_text()
    first_losses = [float(r["first_loss"]) for r in rows]  # same weights, same tokens
    assert max(first_losses) - min(first_losses) < 1e-4, first_losses


def test_train_toy_llama_against_hugging_face(tmp_path):
    """The suite's llama_train step at toy size: ours and HF's LlamaForCausalLM from the same
    weights give the same first loss, into --name's files."""
    run_script("benchmarks/train.py", "--toy", "--preset", "llama-3.2-1b", "--backends", "torch,hf",
               "--name", "train_llama", "--out", str(tmp_path))
    _, rows = read_csv(tmp_path / "train_llama.csv")
    assert [r["backend"] for r in rows] == ["torch", "hf"] and rows[0]["preset"] == "llama-3.2-1b (toy)"
    assert float(rows[1]["tokens_per_s"]) > 0
    assert abs(float(rows[0]["first_loss"]) - float(rows[1]["first_loss"])) < 1e-4
    assert not (tmp_path / "train.csv").exists()


def test_generate_toy_matches_hf_greedy_and_reports_both(tmp_path):
    from benchmarks.generate import COLUMNS

    run_script("benchmarks/generate.py", "--toy", "--out", str(tmp_path))
    columns, rows = read_csv(tmp_path / "generate.csv")
    assert tuple(columns) == COLUMNS
    assert {(r["impl"], r["mode"], r["batch"]) for r in rows} == {
        (i, m, b) for i in ("ours", "hf") for m in ("greedy", "sample") for b in ("1", "2")}
    for r in rows:
        assert float(r["prefill_ms"]) > 0 and float(r["ttft_ms"]) > 0 and float(r["decode_tok_s"]) > 0, r
        assert 0 < float(r["pct_of_copy_bw"]), r
    ours = [r for r in rows if r["impl"] == "ours"]
    assert all(0 < float(r["forward_pct"]) and 0 <= float(r["sample_pct"]) for r in ours)
    assert all(float(r["forward_pct"]) + float(r["sample_pct"]) <= 100 for r in ours)  # the rest: Python between steps
    # Same weights, same prompts, greedy, float32: our tokens are HF's tokens.
    assert [float(r["match"]) for r in ours if r["mode"] == "greedy"] == [1.0, 1.0]


def test_toy_runs_build_their_config_without_changing_the_presets(tmp_path):
    import copy

    from benchmarks import generate, train
    from engine.config import PRESETS

    before = copy.deepcopy(PRESETS)
    generate.main(["--toy", "--modes", "greedy", "--out", str(tmp_path)])
    train.main(["--toy", "--backends", "torch", "--out", str(tmp_path)])
    assert PRESETS == before


def test_profile_decodes_through_generates_decode_steps_and_its_phase_hook(monkeypatch):
    from engine import GPT, GPTConfig, profile
    from engine.generate import decode_steps

    hooks = []

    def spy(*args, phase=None, **kwargs):
        hooks.append(phase)
        yield from decode_steps(*args, phase=phase, **kwargs)

    monkeypatch.setattr(profile, "decode_steps", spy)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=1, n_embd=8))
    profile.decode_run(model, batch_size=2, prompt_len=4, new_tokens=3, nvtx=False)()
    assert len(hooks) == 1 and hooks[0] is not None


def test_write_summary_concatenates_tables_in_order(tmp_path):
    (tmp_path / "b.md").write_text("## B table\n")
    (tmp_path / "a.md").write_text("## A table\n")
    text = write_summary(tmp_path, "Suite", ["note one"], ["a", "missing", "b"]).read_text()
    assert text.startswith("# Suite\n\n- note one\n")
    assert text.index("## A table") < text.index("## B table")


@pytest.mark.parametrize("mode, phases", [("train", {"forward", "backward", "optimizer"}),
                                          ("decode", {"prefill", "forward", "sampling"})])
def test_profile_writes_a_chrome_trace_with_our_phases(tmp_path, mode, phases):
    stdout = run_script("-m", "engine", "profile", "--preset", "tiny", "--mode", mode, "--steps", "2",
                        "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path), "--device", "cpu")
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert phases <= names, sorted(n for n in names if n and not n.startswith("aten::"))[:40]
    assert {"step.0", "step.1"} <= names if mode == "train" else "step.0" in names
    assert "aten::addmm" in stdout or "aten::mm" in stdout  # the top-15 table


def test_profile_rejects_bad_arguments(tmp_path):
    result = subprocess.run([sys.executable, "-m", "engine", "profile", "--preset", "tiny", "--mode", "decode", "--steps", "300",
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "exceeds the model's context of 256 tokens" in result.stderr


def test_gpu_suite_refuses_to_run_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the suite would run for minutes")
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(tmp_path / "out")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "no CUDA GPU visible" in result.stderr
    assert not (tmp_path / "out").exists()
