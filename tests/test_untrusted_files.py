"""A checkpoint or Hugging Face folder is untrusted input: every missing, truncated, corrupt,
mismatched or hostile file gives one line naming the file and what is wrong (an InputError;
exit 2 on the command line), and nothing in it runs."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import GPT, GPTConfig, cli
from engine.checkpoint import load_checkpoint, read_run_info, save_checkpoint
from engine.errors import InputError
from engine.tokenizer import Tokenizer
from engine.train import TrainConfig, make_optimizer

TEXT = ["hello there, how are you? fine, thanks. the quick brown fox jumps over the lazy dog."] * 5


class RunsCode:
    """Unpickling this opens (creates) a marker file: a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def tiny_model(vocab_size, n_embd=16):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=n_embd))


def trainer_state(model):
    """What train() saves after one step: AdamW's state, the step, the RNG."""
    optimizer = make_optimizer(model, TrainConfig(max_steps=1))
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model(ids, ids)[1].backward()
    optimizer.step()
    return {"optimizer": optimizer.state_dict(), "step": 1, "rng_cpu": torch.get_rng_state()}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    tokenizer = Tokenizer.train(TEXT, vocab_size=300)
    model = tiny_model(tokenizer.vocab_size)
    run_info = {"kind": "pretrain", "data": "builtin", "world": {"n_people": 10, "seed": 0, "bios_per_person": 6}, "preset": "tiny"}
    return save_checkpoint(tmp_path_factory.mktemp("run"), 1, model, tokenizer, trainer_state(model), run_info)


@pytest.fixture(scope="module")
def good_hf_folder(good_checkpoint, tmp_path_factory):
    pytest.importorskip("transformers")
    from engine.hf import export

    model, tokenizer, _, _ = load_checkpoint(good_checkpoint)
    return export(model, tokenizer, tmp_path_factory.mktemp("hf") / "gpt2")


# ---- mutations: each takes the folder and damages one file ----
def delete(name):
    return lambda folder: (folder / name).unlink()


def write(name, content):
    return lambda folder: (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def truncate(name):
    def mutate(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return mutate


def edit_json(name, change):
    def mutate(folder):
        fields = json.loads((folder / name).read_text())
        change(fields)
        (folder / name).write_text(json.dumps(fields))

    return mutate


def edit_weights(change, name="model.safetensors"):
    def mutate(folder):
        weights = load_file(folder / name)
        change(weights)
        save_file(weights, folder / name)

    return mutate


def edit_trainer_state(change):
    def mutate(folder):
        state = torch.load(folder / "trainer_state.pt", weights_only=True)
        change(state)
        torch.save(state, folder / "trainer_state.pt")

    return mutate


def hostile_pickle(name):
    return lambda folder: torch.save({"step": 1, "payload": RunsCode(folder / "code-ran")}, folder / name)


def bigger_tokenizer(folder):
    tokenizer = Tokenizer.load(folder / "tokenizer.json")
    tokenizer.hf.add_tokens([f"extra{i}" for i in range(50)])
    tokenizer.save(folder / "tokenizer.json")


def other_models_optimizer(state):
    state["optimizer"] = trainer_state(tiny_model(50, n_embd=32))["optimizer"]


H0 = "transformer.h.0."
# (file at fault, or "" where the message names the folder; damage; what the message says)
CHECKPOINT_CASES = {
    "weights missing": ("", delete("model.safetensors"), "incomplete checkpoint, no model.safetensors"),
    "weights truncated": ("model.safetensors", truncate("model.safetensors"), "not a readable safetensors file"),
    "weights not safetensors": ("model.safetensors", write("model.safetensors", b"\x00" * 64), "not a readable safetensors file"),
    "weights lack a tensor": ("model.safetensors", edit_weights(lambda w: w.pop(H0 + "ln_1.bias")), r"missing \['transformer.h.0.ln_1.bias'\]"),
    "weights have an extra tensor": ("model.safetensors", edit_weights(lambda w: w.update(extra=torch.zeros(2))), r"unexpected \['extra'\]"),
    "weights of another shape": ("model.safetensors", edit_weights(lambda w: w.update({H0 + "ln_1.bias": torch.zeros(17)})), "has shape"),
    "weights not floating point": ("model.safetensors", edit_weights(lambda w: w.update({H0 + "ln_1.bias": torch.zeros(16, dtype=torch.int64)})), "torch.int64, expected floating-point"),
    "untied head": ("model.safetensors", edit_weights(lambda w: w.update({"transformer.wte.weight": w["lm_head.weight"] + 1})), "differs from transformer.wte.weight"),
    "config missing": ("", delete("config.json"), "incomplete checkpoint, no config.json"),
    "config not JSON": ("config.json", write("config.json", "{not json"), "not valid JSON"),
    "config not an object": ("config.json", write("config.json", "[1, 2]"), "expected a JSON object"),
    "config lacks a field": ("config.json", edit_json("config.json", lambda c: c.pop("n_layer")), r"missing fields \['n_layer'\]"),
    "config has an unknown field": ("config.json", edit_json("config.json", lambda c: c.update(rope=True)), r"unknown fields \['rope'\]"),
    "config field of the wrong type": ("config.json", edit_json("config.json", lambda c: c.update(n_head="two")), "n_head must be a positive integer"),
    "config heads don't divide": ("config.json", edit_json("config.json", lambda c: c.update(n_head=3)), "divisible by n_head"),
    "config eps not a number": ("config.json", edit_json("config.json", lambda c: c.update(layer_norm_epsilon="tiny")), "layer_norm_epsilon"),
    # 2**24 wide: ~20 GB of weights, were the model allocated before the check
    "config disagrees with weights": ("model.safetensors", edit_json("config.json", lambda c: c.update(n_embd=2**24)), "has shape .* config.json makes it"),
    "tokenizer missing": ("", delete("tokenizer.json"), "incomplete checkpoint, no tokenizer.json"),
    "tokenizer not JSON": ("tokenizer.json", write("tokenizer.json", "{not json"), "not a tokenizer"),
    "tokenizer not a tokenizer": ("tokenizer.json", write("tokenizer.json", '{"a": 1}'), "not a tokenizer"),
    "tokenizer bigger than the model": ("tokenizer.json", bigger_tokenizer, "tokens, but the model has only"),
    "trainer state missing": ("", delete("trainer_state.pt"), "incomplete checkpoint, no trainer_state.pt"),
    "trainer state truncated": ("trainer_state.pt", truncate("trainer_state.pt"), "not a readable PyTorch file"),
    "trainer state empty": ("trainer_state.pt", write("trainer_state.pt", b""), "not a readable PyTorch file"),
    "trainer state junk": ("trainer_state.pt", write("trainer_state.pt", b"junkjunk"), "not a readable PyTorch file"),
    "trainer state runs code": ("trainer_state.pt", hostile_pickle("trainer_state.pt"), "refused, since unpickling them could run code"),
    "trainer state not a dict": ("trainer_state.pt", lambda folder: torch.save([1, 2], folder / "trainer_state.pt"), "expected a dict"),
    "trainer state lacks the step": ("trainer_state.pt", edit_trainer_state(lambda s: s.pop("step")), "expected a dict with optimizer, step"),
    "trainer state step not an int": ("trainer_state.pt", edit_trainer_state(lambda s: s.update(step="1")), "step must be"),
    "trainer state rng wrong": ("trainer_state.pt", edit_trainer_state(lambda s: s.update(rng_cpu=torch.zeros(3))), "rng_cpu is not"),
    "trainer state not AdamW": ("trainer_state.pt", edit_trainer_state(lambda s: s["optimizer"]["state"][0].clear()), "lacks AdamW's moments"),
    "trainer state of another model": ("trainer_state.pt", edit_trainer_state(other_models_optimizer), "optimizer state is for another model"),
    "run info not JSON": ("run.json", write("run.json", "{"), "not valid JSON"),
    "run info field of the wrong type": ("run.json", edit_json("run.json", lambda r: r.update(kind=3)), "kind has the wrong type"),
    "run info world unknown fields": ("run.json", edit_json("run.json", lambda r: r["world"].update(planets=3)), "world has fields"),
    "run info world too small": ("run.json", edit_json("run.json", lambda r: r["world"].update(n_people=0)), "n_people must be"),
}


def damaged_copy(good, tmp_path, mutate):
    folder = tmp_path / good.name
    shutil.copytree(good, folder)
    mutate(folder)
    return folder


def assert_one_line_about(err: Exception, path: Path, message: str):
    text = str(err)
    assert "\n" not in text, text
    assert str(path) in text, text
    assert re.search(message, text), text
    assert "weights_only" not in text, text  # PyTorch's advice to load unsafely must never reach the user


def test_the_intact_folders_load(good_checkpoint, good_hf_folder):
    from engine.hf import load_hf

    model, tokenizer, state, _ = load_checkpoint(good_checkpoint, with_trainer_state=True)
    assert state["step"] == 1 and read_run_info(good_checkpoint)["world"]["n_people"] == 10
    hf_model, hf_tokenizer = load_hf(good_hf_folder)
    assert hf_tokenizer.vocab_size == tokenizer.vocab_size
    for (name, a), b in zip(model.state_dict().items(), hf_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert hf_model.lm_head.weight is hf_model.transformer.wte.weight  # still tied after loading


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_damaged_checkpoint_files_are_named(good_checkpoint, tmp_path, case):
    name, mutate, message = CHECKPOINT_CASES[case]
    folder = damaged_copy(good_checkpoint, tmp_path, mutate)
    with pytest.raises(InputError) as err:
        load_checkpoint(folder, with_trainer_state=True)  # what --resume reads...
        read_run_info(folder)  # ...and then this, where only run.json is damaged
    assert_one_line_about(err.value, folder / name, message)
    assert not (folder / "code-ran").exists()


def test_the_hostile_pickle_would_run_code(good_checkpoint, tmp_path):
    """The refusal above means something: loaded the unsafe way, the same file runs its code."""
    folder = damaged_copy(good_checkpoint, tmp_path, hostile_pickle("trainer_state.pt"))
    torch.load(folder / "trainer_state.pt", weights_only=False)
    assert (folder / "code-ran").exists()


def shard(folder):
    """Split model.safetensors in two shards and an index, as save_pretrained does for big models."""
    weights = load_file(folder / "model.safetensors")
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard_name, shard_names in halves.items():
        save_file({n: weights[n] for n in shard_names}, folder / shard_name)
    weight_map = {n: shard_name for shard_name, shard_names in halves.items() for n in shard_names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "model.safetensors").unlink()


def sharded_then(mutate):
    return lambda folder: (shard(folder), mutate(folder))


def as_pytorch_bin(payload):
    def mutate(folder):
        (folder / "model.safetensors").unlink()
        torch.save(payload(folder), folder / "pytorch_model.bin")

    return mutate


INDEX = "model.safetensors.index.json"
HF_CASES = {
    "config missing": ("", delete("config.json"), "no config.json"),
    "config not JSON": ("config.json", write("config.json", "{not json"), "not valid JSON"),
    "config of another model": ("config.json", edit_json("config.json", lambda c: c.update(model_type="bert")), "model_type is 'bert'"),  # Llama loads since issue 16
    "config size of the wrong type": ("config.json", edit_json("config.json", lambda c: c.update(n_embd={"a": 1})), "n_embd must be a positive integer"),
    "config heads don't divide": ("config.json", edit_json("config.json", lambda c: c.update(n_head=3)), "divisible by n_head"),
    "config disagrees with weights": ("model.safetensors", edit_json("config.json", lambda c: c.update(n_layer=2)), r"missing \['transformer.h.1"),
    "weights missing": ("", delete("model.safetensors"), "no weights"),
    "weights truncated": ("model.safetensors", truncate("model.safetensors"), "not a readable safetensors file"),
    "weights lack a tensor": ("model.safetensors", edit_weights(lambda w: w.pop(H0 + "mlp.c_fc.bias")), r"missing \['transformer.h.0.mlp.c_fc.bias'\]"),
    "weights of another shape": ("model.safetensors", edit_weights(lambda w: w.update({H0 + "attn.c_attn.weight": torch.zeros(16, 16)})), "has shape"),
    "weights not floating point": ("model.safetensors", edit_weights(lambda w: w.update({H0 + "ln_2.weight": torch.ones(16, dtype=torch.bool)})), "torch.bool, expected floating-point"),
    "index not JSON": (INDEX, sharded_then(write(INDEX, "{")), "not valid JSON"),
    "index without weight_map": (INDEX, sharded_then(write(INDEX, "{}")), "no weight_map"),
    "index points outside the folder": (INDEX, sharded_then(edit_json(INDEX, lambda i: i["weight_map"].update(x="../../elsewhere.safetensors"))), "outside the folder"),
    "shard missing": ("model-00002-of-00002.safetensors", sharded_then(delete("model-00002-of-00002.safetensors")), "missing"),
    "shard truncated": ("model-00001-of-00002.safetensors", sharded_then(truncate("model-00001-of-00002.safetensors")), "not a readable safetensors file"),
    "pytorch_model.bin runs code": ("pytorch_model.bin", as_pytorch_bin(lambda folder: {"w": RunsCode(folder / "code-ran")}), "refused"),
    "pytorch_model.bin not tensors": ("pytorch_model.bin", as_pytorch_bin(lambda folder: {"w": 1}), "expected a dict of tensor names to tensors"),
    "tokenizer corrupt": ("tokenizer.json", write("tokenizer.json", "[]"), "not a tokenizer"),
    "tokenizer bigger than the model": ("tokenizer.json", bigger_tokenizer, "tokens, but the model has only"),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_damaged_hf_files_are_named(good_hf_folder, tmp_path, case):
    from engine.hf import load_hf

    name, mutate, message = HF_CASES[case]
    folder = damaged_copy(good_hf_folder, tmp_path, mutate)
    with pytest.raises(InputError) as err:
        load_hf(folder)
    assert_one_line_about(err.value, folder / name, message)
    assert not (folder / "code-ran").exists()


# ---- the command line: one damaged file per command ----
def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


CKPT, RUN, OUT = "CKPT", "RUN", "OUT"  # the damaged checkpoint, the run folder holding it, a folder to create
CLI_CASES = {  # command -> (file at fault, damage, arguments)
    "generate": ("model.safetensors", truncate("model.safetensors"), ["--ckpt", CKPT, "--prompt", "hi", "--device", "cpu"]),
    "chat": ("tokenizer.json", write("tokenizer.json", "{not json"), ["--ckpt", CKPT, "--device", "cpu"]),
    "eval": ("run.json", edit_json("run.json", lambda r: r["world"].update(n_people="ten")), ["--ckpt", CKPT, "--device", "cpu"]),
    "finetune": ("config.json", edit_json("config.json", lambda c: c.update(n_layer=-1)),
                 ["--init", CKPT, "--out", OUT, "--data", "builtin", "--max-steps", "1", "--device", "cpu"]),
    "pretrain": ("trainer_state.pt", hostile_pickle("trainer_state.pt"),
                 ["--out", RUN, "--resume", "--data", "builtin", "--max-steps", "2", "--device", "cpu"]),
    "export": ("model.safetensors", edit_weights(lambda w: w.update({"transformer.wpe.weight": torch.zeros(64, 16)})),
               ["--ckpt", CKPT, "--out", OUT]),
}


@pytest.mark.parametrize("command", CLI_CASES)
def test_each_command_names_the_damaged_file_in_one_line(good_checkpoint, tmp_path, command):
    name, mutate, arguments = CLI_CASES[command]
    run = tmp_path / "run"
    run.mkdir()
    folder = damaged_copy(good_checkpoint, run, mutate)
    before = digest(folder)
    places = {CKPT: folder, RUN: run, OUT: tmp_path / "out"}
    result = subprocess.run([sys.executable, "-m", "engine", command, *(str(places.get(a, a)) for a in arguments)],
                            input="hello\n", capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"llm-engine {command}: error: {folder / name}"), result.stderr
    assert "weights_only" not in result.stderr
    assert digest(folder) == before and sorted(p.name for p in run.iterdir()) == [folder.name]  # nothing written
    assert not (tmp_path / "out").exists() and not (folder / "code-ran").exists()


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only bad input becomes a one-line exit 2; a RuntimeError, ValueError or OSError from a bug propagates."""
    for bug in (RuntimeError, ValueError, OSError):
        def cmd_generate(args, bug=bug):
            raise bug("a bug")

        monkeypatch.setattr(cli, "cmd_generate", cmd_generate)
        with pytest.raises(bug, match="a bug"):
            cli.main(["generate", "--ckpt", "x", "--prompt", "hi"])


# ---- bad arguments and data files: one line, exit 2, from every module that checks them ----
BAD_ARGUMENTS = {
    "--max-steps 0": (["pretrain", "--data", "builtin", "--max-steps", "0"], "--max-steps must be >= 1"),
    "unknown preset": (["pretrain", "--data", "builtin", "--max-steps", "1", "--preset", "huge"], "unknown preset 'huge'"),
    "one person": (["pretrain", "--data", "builtin", "--max-steps", "1", "--n-people", "1"], "n_people must be between 2"),
    "--block-size -1": (["pretrain", "--data", "builtin", "--max-steps", "1", "--block-size", "-1"], "block_size must be a positive integer"),
    "profile --steps 0": (["profile", "--preset", "tiny", "--steps", "0"], "--steps and --batch-size must be >= 1"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, case):
    argv, message = BAD_ARGUMENTS[case]
    assert cli.main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llm-engine {argv[0]}: error: ") and message in err and err.count("\n") == 1, err


def test_an_hf_folder_without_tokenizer_cannot_generate(good_hf_folder, tmp_path, capsys):
    folder = damaged_copy(good_hf_folder, tmp_path, delete("tokenizer.json"))
    assert cli.main(["generate", "--hf", str(folder), "--prompt", "hi", "--device", "cpu"]) == 2
    assert "no tokenizer.json in the folder; generation needs one" in capsys.readouterr().err


def test_damaged_data_files_are_named(tmp_path):
    from engine.data import load_conversations, read_corpus, read_tokens, write_tokens

    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match=f"{tmp_path / 'latin1.txt'} as UTF-8"):
        read_corpus(tmp_path / "latin1.txt")
    (tmp_path / "chats.jsonl").write_bytes(b'{"messages": []}\xff\n')
    with pytest.raises(InputError, match="as UTF-8"):
        load_conversations(tmp_path / "chats.jsonl")
    tokens = write_tokens(__import__("numpy").arange(10), tmp_path / "train", 300)
    tokens.write_bytes(tokens.read_bytes()[:-2])  # truncated: one token short
    with pytest.raises(InputError, match=f"{tokens}: missing or not the 10 uint16 tokens"):
        read_tokens(tokens)
    tokens.with_suffix(".json").write_text('{"dtype": "object", "num_tokens": 10}')
    with pytest.raises(InputError, match="expected a uint16 or uint32 dtype"):
        read_tokens(tokens)
    tokens.with_suffix(".json").write_text("{")
    with pytest.raises(InputError, match=f"{tokens.with_suffix('.json')}: not a token-file header"):
        read_tokens(tokens)


def test_a_checkpoint_without_run_json_resumes(tmp_path):
    """run.json is optional (checkpoint.py's docstring): pretrain --resume used to crash without it."""
    from engine.jobs import pretrain

    def run(steps, resume):
        cfg = TrainConfig(max_steps=steps, batch_size=2, eval_every=steps, eval_batches=1)
        return pretrain("builtin", tmp_path, "tiny", cfg, backend="torch", device="cpu", resume=resume, vocab_size=300,
                        n_people=2, block_size=16, progress=False)

    run(1, resume=False)
    (tmp_path / "step-0000001" / "run.json").unlink()
    assert run(2, resume=True)["step"] == 2
