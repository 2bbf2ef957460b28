"""The GPU suite without a GPU: its targets table computed from small hand-written results (a
target that passes, one that fails, ones not measured and why), and the suite's dry run, which
runs every step of both parts at toy size on the CPU, so the suite cannot rot between GPU runs."""
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import targets
from benchmarks.targets import Run

ROOT = Path(__file__).resolve().parents[1]

ATTENTION = """mode,impl,batch,heads,seqlen,cache,head_dim,causal,dtype,ms,tflops
fwd,ours,4,16,4096,,128,True,bfloat16,2.0,600
fwd,sdpa-flash,4,16,4096,,128,True,bfloat16,2.2,545
fwd,sdpa-cudnn,4,16,4096,,128,True,bfloat16,1.9,631
fwd,sdpa-math,4,16,4096,,128,True,bfloat16,,
fwd,ours,2,16,8192,,128,True,bfloat16,7.0,560
fwd,sdpa-flash,2,16,8192,,128,True,bfloat16,7.7,509
fwd,ours,4,32,4096,,64,True,bfloat16,1.0,600
fwd,sdpa-flash,4,32,4096,,64,True,bfloat16,5.0,120
fwd,ours,8,16,2048,,128,True,bfloat16,1.0,300
fwd,sdpa-flash,8,16,2048,,128,True,bfloat16,0.5,600
fwd+bwd,ours,4,16,4096,,128,True,bfloat16,6.0,700
fwd+bwd,ours-atomic,4,16,4096,,128,True,bfloat16,5.0,840
fwd+bwd,sdpa-flash,4,16,4096,,128,True,bfloat16,6.6,636
fwd+bwd,sdpa-cudnn,4,16,4096,,128,True,bfloat16,5.9,711
fwd+bwd,ours,2,16,8192,,128,True,bfloat16,21.0,700
fwd+bwd,sdpa-flash,2,16,8192,,128,True,bfloat16,23.1,636
decode,ours,1,16,1,1024,128,True,bfloat16,0.010,1
decode,sdpa-flash,1,16,1,1024,128,True,bfloat16,0.009,1
decode,sdpa-efficient,1,16,1,1024,128,True,bfloat16,0.008,1
decode,ours,1,16,1,32768,128,True,bfloat16,0.1,1
decode,sdpa-flash,1,16,1,32768,128,True,bfloat16,0.1,1
decode,ours,1,16,1,512,128,True,bfloat16,1.0,1
decode,sdpa-flash,1,16,1,512,128,True,bfloat16,0.1,1
"""
ATTENTION_GQA = """mode,impl,batch,heads,kv_heads,seqlen,cache,head_dim,causal,dtype,ms,tflops
fwd,ours,4,32,8,4096,,128,True,bfloat16,2.0,600
fwd,sdpa-flash,4,32,8,4096,,128,True,bfloat16,2.4,500
fwd,sdpa-efficient,4,32,8,4096,,128,True,bfloat16,,
fwd,ours,2,32,8,8192,,128,True,bfloat16,7.0,560
fwd,sdpa-flash,2,32,8,8192,,128,True,bfloat16,7.7,509
fwd,ours,8,32,8,2048,,128,True,bfloat16,1.0,300
fwd,sdpa-flash,8,32,8,2048,,128,True,bfloat16,0.5,600
fwd,ours,4,32,32,4096,,128,True,bfloat16,1.0,600
fwd,sdpa-flash,4,32,32,4096,,128,True,bfloat16,0.5,1200
fwd+bwd,ours,4,32,8,4096,,128,True,bfloat16,6.0,700
fwd+bwd,sdpa-flash,4,32,8,4096,,128,True,bfloat16,3.0,1400
decode,ours,1,32,8,1,4096,128,True,bfloat16,0.1,1
decode,sdpa-flash,1,32,8,1,4096,128,True,bfloat16,0.01,1
"""
LAYERNORM = """mode,N,M,dtype,provider,ms,GB/s,copy GB/s,fraction of copy
forward,1024,32768,bfloat16,triton,0.04,3700,4000,0.93
forward,4096,32768,bfloat16,triton,0.15,3640,4000,0.91
forward,768,32768,bfloat16,triton,0.05,2000,4000,0.5
both,1024,32768,bfloat16,triton,1.0,1,1,1
both,1024,32768,bfloat16,torch,1.6,1,1,1
both,4096,32768,bfloat16,triton,2.0,1,1,1
both,4096,32768,bfloat16,torch,3.4,1,1,1
"""
TRAIN = """preset,backend,device,dtype,batch,seq_len,params,ms_per_step,tokens_per_s,mfu_pct,peak_mem_mb,speedup_vs_torch
gpt2,torch,cuda,bf16-autocast,16,1024,124000000,60,273000,32.4,9000,1.0
gpt2,triton,cuda,bf16-autocast,16,1024,124000000,41,400000,47.5,8000,1.46
gpt2,torch.compile,cuda,bf16-autocast,16,1024,124000000,43,380000,45.1,8500,1.39
tiny,triton,cuda,bf16-autocast,16,256,1000000,1,1,1.0,1,1
"""
GENERATE = """impl,mode,batch,prompt_len,new_tokens,prefill_ms,ttft_ms,decode_tok_s,sample_pct,match,speedup_vs_hf,pct_of_copy_bw
ours,greedy,1,512,64,5,6,500,3,1.0,2.0,40
hf,greedy,1,512,64,8,9,250,,,1.0,20
ours,sample,1,512,64,5,6,450,5,,1.5,36
hf,sample,1,512,64,8,9,300,,,1.0,24
ours,greedy,8,512,64,5,6,100,3,1.0,0.1,40
hf,greedy,8,512,64,8,9,1000,,,1.0,20
"""
CUDA_TESTS = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1">
<testcase classname="tests.test_attention" name="test_backward_is_deterministic" time="1"/>
<testcase classname="tests.test_layernorm" name="test_gradients_are_bitwise_deterministic[chunked]" time="1">
<failure message="AssertionError: gradient of input 2: run 2 differs from run 1">trace</failure></testcase>
<testcase classname="tests.test_attention" name="test_bf16_on_gpu[True]" time="1"/>
<testcase classname="tests.test_sampling" name="test_pinned" time="0"><skipped message="needs a CUDA GPU"/></testcase>
</testsuite></testsuites>
"""
STEPS = "step,outcome,seconds,note\n"


def results(folder: Path, files: dict[str, str], core_steps: str = "") -> Path:
    """A results folder as the suite leaves it: the steps' outcomes and the given files."""
    (folder / "steps-setup.csv").write_text(STEPS + 'build_sampler,ok,20,""\nliger,not installed,0,"no wheel in .whl"\n')
    core = "cuda_tests roofline layernorm attention train generate profile".split()
    (folder / "steps-core.csv").write_text(STEPS + (core_steps or "".join(f'{s},ok,10,""\n' for s in core)))
    (folder / "steps-extended.csv").write_text(STEPS + 'gqa,not landed,0,"issue 16"\nfused_loss,not landed,0,"issue 18"\n')
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def verdicts(folder: Path, dry_run: bool = False) -> dict[str, tuple[str, str]]:
    """{target name: (measured, verdict)}."""
    run = Run(folder, dry_run)
    return {t.name: targets.evaluate(t, run) for t in targets.TARGETS}


def find(table: dict, start: str) -> tuple[str, str]:
    (hit,) = [v for name, v in table.items() if name.startswith(start)]
    return hit


def full_results(tmp_path: Path) -> Path:
    return results(tmp_path, {"attention.csv": ATTENTION, "layernorm.csv": LAYERNORM, "train.csv": TRAIN,
                              "generate.csv": GENERATE, "cuda_tests.xml": CUDA_TESTS})


def test_attention_targets_judge_the_worst_of_the_named_shapes(tmp_path):
    table = verdicts(full_results(tmp_path))
    # best SDPA at S=4096 is cudnn (1.9 ms): 0.95x; S=8192: 1.1x. D=64 and S=2048 rows are not the target's.
    assert find(table, "attention forward vs") == ("0.95x (worst of 2: S=4096 D=128 causal bfloat16)", "fail")
    assert find(table, "attention forward TFLOP/s") == ("560 TFLOP/s (worst of 2: S=8192 D=128 causal bfloat16)", "pass")
    # backward = fwd+bwd - fwd: ours 4.0 ms, cudnn 4.0 ms (the best SDPA) at S=4096; 14.0 vs 15.4 at S=8192
    assert find(table, "attention backward") == ("1x (worst of 2: S=4096 D=128 causal bfloat16)", "pass")
    # 1k cache: 0.010 ms against efficient's 0.008 -> 1.25x, over the 1.2x goal; the 512 cache is outside 1k-32k
    assert find(table, "decode attention") == ("1.25x (worst of 2: B=1 cache=1024)", "fail")


TRAIN_LLAMA = """preset,backend,device,dtype,batch,seq_len,params,ms_per_step,tokens_per_s,mfu_pct,peak_mem_mb,speedup_vs_torch,first_loss
llama-3.2-1b,triton,cuda,bf16-autocast,4,2048,1235814400,300,27000,40,30000,,11.7712
llama-3.2-1b,hf,cuda,bf16-autocast,4,2048,1235814400,400,20000,30,33000,,11.7718
"""


def test_llama_train_target_needs_the_same_first_loss(tmp_path):
    results(tmp_path, {"train_llama.csv": TRAIN_LLAMA})
    (tmp_path / "steps-extended.csv").write_text(STEPS + 'llama_train,ok,150,""\n')
    assert find(verdicts(tmp_path), "llama-3.2-1b-shaped") == ("1.35x (llama-3.2-1b 4x2048)", "pass")
    (tmp_path / "train_llama.csv").write_text(TRAIN_LLAMA.replace("11.7718", "11.7812"))
    assert find(verdicts(tmp_path), "llama-3.2-1b-shaped") == (
        "0x (llama-3.2-1b 4x2048, first losses 0.01 apart)", "fail")


def test_gqa_target_reads_attention_gqa_csv(tmp_path):
    """Forward at H=32 over Hkv=8, D=128, bf16, S >= 4096 only: S=2048, Hkv=32, fwd+bwd and decode rows
    are not the target's. Best SDPA / ours: 2.4 / 2.0 = 1.2x at S=4096, 7.7 / 7.0 = 1.1x at S=8192."""
    results(tmp_path, {"attention_gqa.csv": ATTENTION_GQA})
    (tmp_path / "steps-extended.csv").write_text(STEPS + 'gqa,ok,80,""\n')
    assert find(verdicts(tmp_path), "GQA forward") == ("1.1x (worst of 2: S=8192 D=128 causal bfloat16)", "pass")
    (tmp_path / "steps-extended.csv").write_text(STEPS + 'gqa,timed out,120,"cap 120 s"\n')
    (tmp_path / "attention_gqa.csv").write_text(ATTENTION_GQA.splitlines()[0] + "\n")
    assert find(verdicts(tmp_path), "GQA forward") == ("not measured: gqa step timed out after 120 s", "not measured")


LOSS = """N,V,C,dtype,provider,ms,peak_mb,mem_vs_eager,time_vs_eager
16384,131072,2048,bfloat16,eager,100,24000,1.0,1.0
16384,131072,2048,bfloat16,torch-chunked,150,3000,0.125,1.5
16384,131072,2048,bfloat16,fused,80,4000,0.1667,0.8
16384,131072,2048,bfloat16,liger,88,3500,0.1458,0.88
8192,50257,768,bfloat16,eager,10,9000,1.0,1.0
8192,50257,768,bfloat16,fused,20,8000,0.89,2.0
8192,50257,768,bfloat16,liger,5,1000,0.11,0.5
"""


def test_fused_loss_targets_read_loss_csv(tmp_path):
    """Only the 16k x 128k x 2048 bf16 rows count (GPT-2's head rows would fail both): memory
    4000 / 24000 = 0.167 of eager, speed 88 / 80 = 1.1x Liger's."""
    results(tmp_path, {"loss.csv": LOSS})
    (tmp_path / "steps-setup.csv").write_text(STEPS + 'build_sampler,ok,20,""\nliger,ok,5,""\n')
    (tmp_path / "steps-extended.csv").write_text(STEPS + 'fused_loss,ok,40,""\n')
    table = verdicts(tmp_path)
    assert find(table, "fused linear cross-entropy peak memory") == ("0.167x (N=16384 V=131072 C=2048)", "pass")
    assert find(table, "fused linear cross-entropy speed vs Liger") == ("1.1x (N=16384 V=131072 C=2048)", "pass")
    (tmp_path / "loss.csv").write_text("\n".join(line for line in LOSS.splitlines() if ",liger," not in line) + "\n")
    assert find(verdicts(tmp_path), "fused linear cross-entropy speed vs Liger") == (
        "not measured: no liger rows in loss.csv", "not measured")
    (tmp_path / "steps-setup.csv").write_text(STEPS + 'build_sampler,ok,20,""\nliger,not installed,0,"no wheel"\n')
    assert find(verdicts(tmp_path), "fused linear cross-entropy speed vs Liger") == (
        "not measured: liger not installed (no wheel)", "not measured")


def test_layernorm_training_and_decode_targets(tmp_path):
    table = verdicts(full_results(tmp_path))
    assert find(table, "LayerNorm forward, share") == ("91% (worst of 2: N=4096)", "pass")
    assert find(table, "LayerNorm forward+backward vs torch") == ("1.6x (worst of 2: N=1024)", "pass")
    assert find(table, "LayerNorm forward+backward vs Liger") == (
        "not measured: liger not installed (no wheel in .whl)", "not measured")
    assert find(table, "gpt2 bf16 training MFU") == ("47.5% (gpt2 16x1024)", "pass")
    assert find(table, "gpt2 bf16 training tokens/s vs torch.compile") == ("1.05x (gpt2 16x1024)", "fail")
    assert find(table, "gpt2 batch-1 decode") == ("1.5x (worst of 2: sample B=1)", "pass")


def test_test_targets_read_the_junit_report(tmp_path):
    table = verdicts(full_results(tmp_path))
    assert find(table, "attention gradients bitwise") == ("1 of 1 passed", "pass")
    assert find(table, "LayerNorm gradients bitwise") == (
        "0 of 1 passed; failed: test_gradients_are_bitwise_deterministic[chunked]", "fail")
    assert find(table, "all cuda tests pass") == (
        "2 of 3 passed; failed: test_gradients_are_bitwise_deterministic[chunked]", "fail")


def test_unmeasured_targets_say_why(tmp_path):
    core = ('cuda_tests,timed out,50,"cap 50 s"\nattention,timed out,140,"cap 140 s"\n'
            'layernorm,failed,3,"exit 1, see layernorm.log"\ntrain,ok,90,""\ngenerate,ok,50,""\n')
    table = verdicts(results(tmp_path, {"attention.csv": ATTENTION.splitlines()[0] + "\n",
                                        "generate.csv": GENERATE.replace("ours,", "hf,")}, core))
    assert find(table, "attention forward vs") == ("not measured: attention step timed out after 140 s", "not measured")
    assert find(table, "LayerNorm forward, share")[0] == "not measured: layernorm step failed (exit 1, see layernorm.log)"
    assert find(table, "gpt2 batch-1 decode")[0] == "not measured: no row of its shapes in the results"
    assert find(table, "all cuda tests pass")[0] == "not measured: cuda_tests step timed out after 50 s"
    assert find(table, "GQA forward") == ("not measured: issue 16 has not landed", "not measured")
    assert find(table, "compiled gpt2 batch-1 decode vs HF")[0] == "not measured: compiled_decode step not run"
    skipped = '<testcase classname="tests.test_x" name="test_{}"><skipped message="needs a CUDA GPU"/></testcase>'
    (tmp_path / "cuda_tests.xml").write_text(f"<testsuites><testsuite>{''.join(skipped.format(i) for i in range(3))}"
                                             "</testsuite></testsuites>")
    assert find(verdicts(tmp_path), "attention gradients bitwise")[0] == (
        "not measured: cuda_tests step timed out after 50 s")
    (tmp_path / "steps-core.csv").write_text(STEPS + 'cuda_tests,ok,40,""\n')
    assert find(verdicts(tmp_path), "all cuda tests pass")[0] == "not measured: all 3 skipped (needs a CUDA GPU)"


def test_rows_written_before_a_timeout_count_as_partial(tmp_path):
    core = 'attention,timed out,140,"cap 140 s"\n'
    table = verdicts(results(tmp_path, {"attention.csv": ATTENTION}, core))
    assert find(table, "attention forward vs") == (
        "0.95x (worst of 2: S=4096 D=128 causal bfloat16); partial: attention step timed out after 140 s", "fail")


def test_dry_run_judges_toy_shapes_that_a_real_run_ignores(tmp_path):
    toy = "\n".join(line.replace(",128,True,bfloat16,", ",32,True,float32,") for line in ATTENTION.splitlines()) + "\n"
    results(tmp_path, {"attention.csv": toy})
    assert find(verdicts(tmp_path), "attention forward vs")[1] == "not measured"
    assert find(verdicts(tmp_path, dry_run=True), "attention forward vs")[1] in ("pass", "fail")
    assert "dry run" in targets.table(Run(tmp_path, dry_run=True)).splitlines()[0]


def test_targets_script_writes_the_table(tmp_path):
    text = targets.main([str(full_results(tmp_path))])
    assert (tmp_path / "targets.md").read_text() == text
    assert "| target | measured | goal | pass/fail |" in text
    assert len([line for line in text.splitlines() if line.startswith("| ") and " | " in line]) == 1 + len(targets.TARGETS)
    assert "pass, " in text.splitlines()[-1]


# ----------------------------------------------------------------------------- the suite itself


def run_suite(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def steps(path: Path) -> dict[str, str]:
    return {row["step"]: row["outcome"] for row in targets.read_csv(path)}


def test_dry_run_runs_every_step_of_both_parts_and_ends_with_the_table(tmp_path):
    start = time.monotonic()
    result = run_suite("--dry-run", str(tmp_path), timeout=1200)
    took = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    core = steps(tmp_path / "steps-core.csv")
    assert core == {s: "ok" for s in ("cuda_tests", "roofline", "layernorm", "attention", "train", "generate", "profile")} | {
        "part core": "done"}, core
    extended = steps(tmp_path / "steps-extended.csv")
    assert extended.pop("gqa") == "ok" and extended.pop("part extended") == "done"
    assert extended.pop("llama_train") == "ok" and extended.pop("fused_loss") == "ok"
    assert extended.pop("compiled_decode") == "ok" and extended.pop("tuning") == "ok"  # tuning: --toy in a dry run
    assert not extended, extended
    assert steps(tmp_path / "steps-setup.csv")["build_sampler"] == "ok"
    table = (tmp_path / "targets.md").read_text()
    assert "dry run" in table.splitlines()[0]
    assert result.stdout.rstrip().endswith(table.rstrip()), result.stdout[-2000:]
    for t in targets.TARGETS:
        assert f"| {t.name} |" in table
    assert [line for line in table.splitlines() if line.startswith("| tuned kernel configurations")][0].endswith("| pass |")
    assert [line for line in table.splitlines() if line.startswith("| compiled gpt2 batch-1 decode vs HF")][0].endswith(
        ("| pass |", "| fail |"))
    assert [line for line in table.splitlines() if line.startswith("| fused linear cross-entropy peak memory")][0].endswith(
        ("| pass |", "| fail |"))
    assert [line for line in table.splitlines() if line.startswith("| llama-3.2-1b-shaped")][0].endswith(("| pass |", "| fail |"))
    assert [line for line in table.splitlines() if line.startswith("| GQA forward")][0].endswith(("| pass |", "| fail |"))
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "cuda_tests.xml").is_file()
    print(f"dry run of both parts: {took:.0f} s")


def test_one_part_alone_says_the_other_was_not_run(tmp_path):
    result = run_suite("--dry-run", "--part", "extended", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (tmp_path / "steps-core.csv").exists()
    assert "| not measured: attention step not run |" in (tmp_path / "targets.md").read_text()


def test_suite_rejects_an_unknown_part():
    result = run_suite("--part", "everything", timeout=60)
    assert result.returncode == 2 and "--part takes core, extended or all" in result.stderr
    result = run_suite("--tune", "--part", "core", timeout=60)
    assert result.returncode == 2 and "--tune runs the tuning step alone" in result.stderr
