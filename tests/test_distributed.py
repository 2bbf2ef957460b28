"""Data-parallel training under torchrun, on the CPU (gloo, 2 processes, the tiny and llama-tiny
presets at their own sizes): one step of DDP or FSDP2 equals one single-process step on the same global batch;
checkpoints move between world sizes; a dead rank ends the job; bad arguments are one line."""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine
from engine import checkpoint
from engine.config import GPTConfig
from engine.distributed import micro_batches
from engine.errors import InputError
from engine.jobs import finetune, pretrain
from engine.train import TrainConfig

ROOT = Path(engine.__file__).parents[1]  # the workers run `-m engine` from here: this checkout's code
# global batch = 2 micro-batches of 4 sequences: on 2 ranks --grad-accum's default (one per rank),
# on 1 both. The model is the tiny preset at its own sizes; only the built-in world is small.
COMMON = ["--batch-size", "4", "--warmup-steps", "0", "--backend", "torch", "--device", "cpu"]
# 9 people: their tokenizer stops at 761 tokens, which do not split evenly over 2 ranks (see
# test_fsdp_saves_a_vocabulary_that_does_not_split_evenly_over_the_ranks)
N_PEOPLE = 9
PRETRAIN = ["pretrain", "--data", "builtin", "--n-people", str(N_PEOPLE), *COMMON]
# Weights after the same steps on 1 and 2 ranks. The gradients differ by float rounding (another
# summation order), which AdamW's first steps, lr * g / (|g| + 1e-8), amplify where |g| is near
# 1e-8: a few entries in a million move by up to ~1.4e-5 (17 of 924,928 past 1e-6 in one run).
# A wrong batch moves most entries by ~lr (1e-3). So: none past 5% of lr, and at most one in
# 10,000 past 1e-6.
SAME_WEIGHTS_ATOL, LOOSE_ENTRIES_ATOL, LOOSE_ENTRIES_SHARE = 5e-5, 1e-6, 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, command=PRETRAIN):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "engine", *command, *args]


def run_torchrun(*args, command=PRETRAIN, check=True):
    proc = subprocess.run(torchrun(*args, command=command), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


def config(steps, **kw):
    return TrainConfig(max_steps=steps, batch_size=4, grad_accum=2, warmup_steps=0, save_every=1, **kw)


def single_process(out, steps, resume=False, preset="tiny"):
    pretrain("builtin", out, preset, config(steps), backend="torch", device="cpu", resume=resume, n_people=N_PEOPLE, progress=False)


def weights(run, step):
    return load_file(str(run / f"step-{step:07d}" / "model.safetensors"))


def assert_same_weights(a, b):
    """a and b (name -> tensor) equal up to the rounding of another summation order (see above)."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    loose = (diff > LOOSE_ENTRIES_ATOL).sum().item()
    assert diff.max().item() <= SAME_WEIGHTS_ATOL, f"max difference {diff.max().item():.3g}"
    assert loose <= LOOSE_ENTRIES_SHARE * diff.numel(), f"{loose} of {diff.numel()} entries differ by > {LOOSE_ENTRIES_ATOL}"


def losses(run, key="loss"):
    return [json.loads(line)[key] for line in open(run / "metrics.jsonl")]


def cut_back_to_step_1(src, dst):
    """A copy of a 2-step run folder as it was after step 1."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "step-0000002")
    (dst / "metrics.jsonl").write_text((src / "metrics.jsonl").read_text().splitlines(keepends=True)[0])


@pytest.fixture(scope="module", params=["tiny", "llama-tiny"])
def runs(request, tmp_path_factory):
    """Two steps, a checkpoint after each: one process, 2-rank DDP, 2-rank FSDP2; GPT-2 (tiny)
    and Llama (llama-tiny: RMSNorm, RoPE, SwiGLU, GQA) at their preset sizes. The tests that
    use it run once per preset."""
    preset = request.param
    root = tmp_path_factory.mktemp(f"dist-{preset}")
    single_process(root / "single", 2, preset=preset)
    run_torchrun("--preset", preset, "--max-steps", "2", "--save-every", "1", "--out", str(root / "ddp"))
    run_torchrun("--preset", preset, "--max-steps", "2", "--save-every", "1", "--fsdp", "--out", str(root / "fsdp"))
    assert json.loads((root / "fsdp" / "step-0000001" / "config.json").read_text())["arch"] == GPTConfig.from_preset(preset).arch
    return root


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_one_data_parallel_step_equals_one_single_process_step(runs, kind):
    assert_same_weights(weights(runs / kind, 1), weights(runs / "single", 1))
    with pytest.raises(AssertionError):  # the second step changed the weights more than rounding does
        assert_same_weights(weights(runs / kind, 1), weights(runs / kind, 2))
    # only rank 0 logs: one line per step, with the loss and the (pre-clipping) gradient norm of
    # the whole global batch; Adam would hide a wrongly scaled gradient, the norm does not
    assert losses(runs / kind) == pytest.approx(losses(runs / "single"), abs=1e-6)
    assert losses(runs / kind, "grad_norm") == pytest.approx(losses(runs / "single", "grad_norm"), rel=1e-6)
    # the run gave no --grad-accum: its default, one micro-batch per rank, is what the checkpoint records
    assert torch.load(runs / kind / "step-0000001" / "trainer_state.pt", weights_only=True)["train_config"]["grad_accum"] == 2


def test_fsdp_saves_a_vocabulary_that_does_not_split_evenly_over_the_ranks(runs):
    """FSDP2 gathers an unevenly sharded table into a padded buffer; saving it failed on the CPU
    (safetensors: no name covering the storage of the tied wte/lm_head) until it was copied out."""
    step_1 = runs / "fsdp" / "step-0000001"
    vocab_size = json.loads((step_1 / "config.json").read_text())["vocab_size"]
    assert vocab_size % 2 == 1, "the trained vocabulary no longer covers the uneven case: pick another --n-people"
    optimizer = torch.load(step_1 / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    for i, name, t in ((i, name, t) for i, s in optimizer.items() for name, t in s.items() if t.dim()):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), f"optimizer state {i}.{name} saved with padding"


def test_fine_tuning_on_two_ranks_equals_one_process(runs, tmp_path):
    """Conversations: padded micro-batches with loss masks, a different code path into the loop."""
    finetune(runs / "single", "builtin", tmp_path / "single", config(1, lr=5e-4), backend="torch", device="cpu", progress=False)
    run_torchrun("--max-steps", "1", "--lr", "5e-4", "--init", str(runs / "single"), "--out", str(tmp_path / "ddp"),
                 command=["finetune", "--data", "builtin", *COMMON])
    assert_same_weights(weights(tmp_path / "ddp", 1), weights(tmp_path / "single", 1))
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), abs=1e-6)
    assert losses(tmp_path / "ddp", "grad_norm") == pytest.approx(losses(tmp_path / "single", "grad_norm"), rel=1e-6)


def test_a_two_rank_checkpoint_resumes_on_one_rank(runs, tmp_path):
    cut_back_to_step_1(runs / "fsdp", tmp_path / "resumed")
    single_process(tmp_path / "resumed", 2, resume=True)
    assert losses(tmp_path / "resumed")[1] == pytest.approx(losses(runs / "fsdp")[1], abs=1e-6)
    # the optimizer state came along too: the step after the resume lands on the same weights
    assert_same_weights(weights(tmp_path / "resumed", 2), weights(runs / "fsdp", 2))


def test_a_one_rank_checkpoint_resumes_on_two_ranks(runs, tmp_path):
    cut_back_to_step_1(runs / "single", tmp_path / "resumed")
    run_torchrun("--max-steps", "2", "--save-every", "1", "--fsdp", "--resume", "--out", str(tmp_path / "resumed"))
    assert losses(tmp_path / "resumed")[1] == pytest.approx(losses(runs / "single")[1], abs=1e-6)
    assert_same_weights(weights(tmp_path / "resumed", 2), weights(runs / "single", 2))


def worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank (workers are the launcher's children)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            if f"RANK={rank}".encode() in (stat.parent / "environ").read_bytes().split(b"\0"):
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):  # the process is gone, or not ours to read
            continue
    return None


@contextlib.contextmanager
def rank_1_signalled(out, sig, env=None):
    """Start a long 2-rank run, wait for its second checkpoint, send `sig` to rank 1; yields
    (the torchrun process, when the signal was sent). Nothing is left running afterwards."""
    proc = subprocess.Popen(torchrun("--max-steps", "100000", "--save-every", "1", "--eval-every", "100000", "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    victim = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out.glob("step-*"))) < 2:
            time.sleep(0.2)
        victim = worker_pid(proc.pid, 1)
        assert victim is not None, "no rank-1 worker found"
        os.kill(victim, sig)
        yield proc, time.time()
    finally:
        if victim is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_a_dead_rank_ends_the_job_and_the_last_checkpoint_loads(tmp_path):
    out = tmp_path / "run"
    with rank_1_signalled(out, signal.SIGKILL) as (proc, killed):
        _, err = proc.communicate(timeout=90)
        assert time.time() - killed < 60
    assert proc.returncode != 0
    # torchrun's summary names it (as the root cause, or beside rank 0 when rank 0's "connection
    # reset by peer" error was recorded first)
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9", err), err[-3000:]
    model, _, state, _ = checkpoint.load_checkpoint(out, with_trainer_state=True)
    assert state["step"] >= 2


def test_a_frozen_rank_ends_the_job_after_the_timeout(tmp_path):
    """torchrun can't see a rank that hangs; its peers give up after LLM_ENGINE_DIST_TIMEOUT."""
    out = tmp_path / "run"
    with rank_1_signalled(out, signal.SIGSTOP, env={**os.environ, "LLM_ENGINE_DIST_TIMEOUT": "10"}) as (proc, frozen):
        _, err = proc.communicate(timeout=120)
        assert time.time() - frozen < 10 + 30 + 20  # the timeout, torchrun's 30 s grace before SIGKILL, slack
    assert proc.returncode != 0
    assert re.search(r"Root Cause[\s\S]*?rank\s*: 0 \(local_rank: 0\)[\s\S]*Timed out", err), err[-3000:]
    assert checkpoint.load_checkpoint(out, with_trainer_state=True)[2]["step"] >= 2


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_and_saves(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(torchrun("--max-steps", "100000", "--save-every", "100000", "--eval-every", "100000", "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 3):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: launcher and workers alike
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the ranks may see the signal in different steps; they agree on one and rank 0 writes it
    stopped = {int(m) for m in re.findall(r"interrupted at step (\d+); checkpoint saved", err)}
    assert len(stopped) == 1, err[-3000:]
    assert checkpoint.find_checkpoint(out).name == f"step-{stopped.pop():07d}"


@pytest.mark.parametrize("bad", [["--grad-accum", "3"], ["--no-such-flag"]])  # ours (InputError), argparse's
def test_bad_arguments_under_torchrun_are_one_line_from_rank_0_and_exit_2(tmp_path, bad):
    proc = run_torchrun("--max-steps", "1", "--out", str(tmp_path / "run"), *bad, check=False)
    errors = re.findall(r"^.*error: .*$", proc.stderr, re.M)
    assert len(errors) == 1 and errors[0].startswith("llm-engine") and " ".join(bad) in errors[0], proc.stderr[-3000:]
    # torchrun's summary: both workers exited 2 (none stopped by a signal), no traceback of ours
    assert re.findall(r"^\s*exitcode\s*: (-?\d+)", proc.stderr, re.M) == ["2", "2"], proc.stderr[-3000:]
    assert str(ROOT / "engine") not in proc.stderr, proc.stderr[-3000:]


def test_a_bad_argument_only_a_nonzero_rank_meets_is_printed_by_it():
    """Rank 1 leaves reporting to rank 0 and waits for torchrun to stop it; when nothing stops it
    (rank 0 met no error), it prints the error itself rather than lose it."""
    code = "import sys, engine.cli as cli; cli.TORCHRUN_GRACE_S = 0; sys.exit(cli.main(['pretrain']))"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RANK": "1", "WORLD_SIZE": "2"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("rank 1: llm-engine pretrain: error: the following arguments are required: --data"), proc.stderr


def test_the_global_batch_is_split_by_micro_batch_index():
    assert list(micro_batches(4, 0, 2)) == [0, 2] and list(micro_batches(4, 1, 2)) == [1, 3]
    assert list(micro_batches(4, 0, 1)) == [0, 1, 2, 3]
    with pytest.raises(InputError, match=r"--grad-accum 3 .* world size 2"):
        micro_batches(3, 0, 2)


UNTIED_FSDP_SCRIPT = """
import sys, torch
from engine import GPT, GPTConfig, distributed
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.tokenizer import Tokenizer
from engine.train import TrainConfig, make_optimizer

with distributed.process_group(torch.device("cpu"), fsdp=True) as (ctx, _):
    torch.manual_seed(0)  # the same weights on both ranks
    # an odd vocabulary: both tables shard unevenly over the 2 ranks
    config = GPTConfig.from_preset("llama-tiny", vocab_size=301, n_layer=2, block_size=32, tie_embeddings=False)
    model = GPT(config, backend="torch")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model = distributed.wrap(model, ctx)
    optimizer = make_optimizer(model, TrainConfig(max_steps=1))
    plain, _ = distributed.full_state(model, optimizer, ctx)
    if ctx.is_main:  # gathered before any step: exactly the weights the ranks started from, two tables
        assert plain.lm_head.weight is not plain.transformer.wte.weight
        assert all(torch.equal(plain.state_dict()[k], initial[k]) for k in initial)
    x = torch.randint(0, 301, (2, 17), generator=torch.Generator().manual_seed(ctx.rank))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    optimizer.step()
    plain, state = distributed.full_state(model, optimizer, ctx)
    if ctx.is_main:
        head, table = plain.lm_head.weight, plain.transformer.wte.weight
        assert head is not table and not torch.equal(head, table)
        assert not torch.equal(head, initial["lm_head.weight"]) and not torch.equal(table, initial["transformer.wte.weight"])
        tok = Tokenizer.train(["two tables under FSDP2"] * 5, vocab_size=300)
        trainer = {"optimizer": state, "step": 1, "rng_cpu": torch.get_rng_state()}
        back, _, _, _ = load_checkpoint(save_checkpoint(sys.argv[1], 1, plain, tok, trainer), with_trainer_state=True)
        assert back.lm_head.weight is not back.transformer.wte.weight
        assert all(torch.equal(back.state_dict()[k], v) for k, v in plain.state_dict().items())
        print("untied-ok")
"""


def test_fsdp_gathers_an_untied_head_as_its_own_table(tmp_path):
    """FSDP2's full_state re-ties a tied model's head (assign=True loads two copies) and leaves an
    untied one's two tables apart: gathered, saved and loaded bitwise, optimizer state included."""
    script = tmp_path / "untied.py"
    script.write_text(UNTIED_FSDP_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                           str(script), str(tmp_path / "run")], capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "untied-ok" in proc.stdout, proc.stderr[-3000:]
