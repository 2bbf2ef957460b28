"""Checkpoints: save, find, load.

A run folder (`--out DIR`) holds metrics.jsonl, run.json and checkpoint folders step-NNNNNNN/,
each with model.safetensors, config.json, tokenizer.json, trainer_state.pt (optimizer,
step, RNG states) and run.json (what was trained on what; optional). A checkpoint is written into a hidden temporary folder and renamed into
place, so a crash mid-save never leaves a folder that looks complete. Loading uses
safetensors and torch.load(weights_only=True): a checkpoint can't run code.
"""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from engine.config import GPTConfig
from engine.model import GPT
from engine.tokenizer import Tokenizer

FILES = ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt")
KEEP = 2  # checkpoints kept per run folder (the newest)


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and all((path / f).is_file() for f in FILES)


def save_checkpoint(run_dir, step: int, model: GPT, tokenizer: Tokenizer, trainer_state: dict, run_info: dict | None = None) -> Path:
    """Write run_dir/step-NNNNNNN atomically; keep the newest KEEP checkpoints.
    run_info (what data, which world, which command) goes to run.json beside the weights."""
    run_dir = Path(run_dir)
    final = run_dir / f"step-{step:07d}"
    tmp = run_dir / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = getattr(model, "module", model)  # unwrap DDP
    save_model(model, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    tokenizer.save(tmp / "tokenizer.json")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "run.json").write_text(json.dumps(run_info or {}, indent=2))
    for f in tmp.iterdir():  # on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(p for p in run_dir.glob("step-*") if is_checkpoint(p))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path) -> Path:
    """A checkpoint folder itself, or the newest complete checkpoint in a run folder."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--ckpt: {path} is not a folder")
    found = sorted(p for p in path.glob("step-*") if is_checkpoint(p))
    if not found:
        raise FileNotFoundError(f"--ckpt: no complete checkpoint in {path} (a checkpoint folder holds {', '.join(FILES)})")
    return found[-1]


def read_run_info(folder) -> dict:
    path = Path(folder) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_checkpoint(path, device="cpu", backend="auto", with_trainer_state=False):
    """-> (model, tokenizer, trainer_state or None, checkpoint folder)."""
    folder = find_checkpoint(path)
    config = GPTConfig.from_dict(json.loads((folder / "config.json").read_text()))
    model = GPT(config, backend=backend)
    load_model(model, str(folder / "model.safetensors"), device=str(device))
    model.to(device)
    tokenizer = Tokenizer.load(folder / "tokenizer.json")
    state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True) if with_trainer_state else None
    return model, tokenizer, state, folder


def load_source(ckpt=None, hf=None, device="cpu", backend="auto"):
    """What --ckpt / --hf name -> (model, tokenizer or None, run_info, folder). An HF folder has
    no run_info ({}) and may have no tokenizer.json (None)."""
    if hf is None:
        model, tokenizer, _, folder = load_checkpoint(ckpt, device=device, backend=backend)
        return model, tokenizer, read_run_info(folder), folder
    from engine.hf import load_hf

    model, tokenizer = load_hf(hf, backend=backend)
    return model.to(device), tokenizer, {}, Path(hf)
