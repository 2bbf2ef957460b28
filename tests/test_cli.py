"""Every command explains itself; errors name the argument."""
import subprocess
import sys

import pytest

from engine.cli import build_parser

COMMANDS = ["pretrain", "finetune", "tokenize", "generate", "chat", "eval", "export", "demo", "profile"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_subcommand_help_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: llm-engine " + command in capsys.readouterr().out


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("llm-engine") or str(__import__("pathlib").Path(sys.executable).with_name("llm-engine"))
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "pretrain" in result.stdout


def test_bad_arguments_are_named(tmp_path):
    result = run("pretrain", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run"), "--max-steps", "1")
    assert result.returncode == 2
    assert "--data" in result.stderr and "does not exist" in result.stderr
    result = run("generate", "--ckpt", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 2 and f"{tmp_path}: no complete checkpoint" in result.stderr  # the folder --ckpt named


def test_chat_is_driven_by_a_pipe_one_line_per_turn(tmp_path):
    from engine import GPT, GPTConfig
    from engine.checkpoint import save_checkpoint
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.train(["hello there, how are you? fine, thanks."] * 5, vocab_size=300)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path, 0, model, tok, {"step": 0})
    result = subprocess.run([sys.executable, "-m", "engine", "chat", "--ckpt", str(tmp_path), "--max-new-tokens", "5", "--seed", "1"],
                            input="hello\nhow are you?\n/reset\nfine\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 3  # three messages; /reset is a command, not a message


@pytest.mark.parametrize("command", ["pretrain", "profile"])
def test_preset_help_names_every_preset_llamas_included(command, capsys):
    from engine.config import PRESETS

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside "gpt2-medium"
    assert {"llama-tiny", "smollm2-135m", "llama-3.2-1b", "qwen3-0.6b"} <= set(PRESETS)
    assert all(name in text for name in PRESETS), text
    if command == "profile":
        assert "HuggingFaceGPT-2,Llama,Qwen2orQwen3folder" in text  # what --hf reads
