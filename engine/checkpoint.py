"""Checkpoints: save, find, load; and the readers of checkpoint and Hugging Face files.

A run folder (`--out DIR`) holds metrics.jsonl, data/ (pretraining's token files) and
checkpoint folders step-NNNNNNN/, each with model.safetensors, config.json, tokenizer.json,
trainer_state.pt (optimizer, step, RNG states), run.json (what was trained on what;
optional) and tokenizer_config.json (optional: the Jinja chat template of a tokenizer that
came from a Hugging Face folder, and its special tokens). A checkpoint is written into a hidden temporary folder and renamed into place, so
a crash mid-save never leaves a folder that looks complete.

A folder we are asked to load is untrusted input. The readers below check each file against
what the model needs and turn every way it can be wrong (missing, truncated, corrupt,
mismatched, hostile) into an InputError naming the file. Weights are read with safetensors
and pickles with torch.load(weights_only=True): a checkpoint can't run code.
"""
import json
import os
import pickle
import shutil
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.config import GPTConfig
from engine.errors import InputError
from engine.files import read_json, read_tokenizer, reason, require_file
from engine.model import GPT
from engine.tokenizer import Tokenizer

FILES = ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt")
KEEP = 2  # checkpoints kept per run folder (the newest)
TIED = ("transformer.wte.weight", "lm_head.weight")  # one table under two names when config.tie_embeddings, else two
RUN_INFO_TYPES = {"kind": str, "data": str, "preset": str, "init": str, "hf": bool, "finetune_data": str, "world": (dict, type(None))}


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and all((path / f).is_file() for f in FILES)


def write_weights(model: GPT, path) -> None:
    """model.safetensors: every tensor contiguous, a tied table once, under the head's name as
    safetensors' save_model wrote it (the loader restores the other). Not save_model itself: it
    cannot tell shared tensors apart among non-contiguous ones, which a model gets from decode_layout."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        del state[TIED[0]]
    save_file({name: t.contiguous() for name, t in state.items()}, str(path), metadata={"format": "pt"})


def save_checkpoint(run_dir, step: int, model: GPT, tokenizer: Tokenizer, trainer_state: dict, run_info: dict | None = None) -> Path:
    """Write run_dir/step-NNNNNNN atomically; keep the newest KEEP checkpoints.
    run_info (what data, which world, which command) goes to run.json beside the weights."""
    run_dir = Path(run_dir)
    final = run_dir / f"step-{step:07d}"
    tmp = run_dir / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = getattr(model, "module", model)  # unwrap DDP
    write_weights(model, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    tokenizer.save(tmp / "tokenizer.json")
    tokenizer.save_config(tmp)  # a Hugging Face chat template, if the tokenizer came with one
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
        raise InputError(f"{path}: not a folder (expected a checkpoint folder or a run folder)")
    missing = [f for f in FILES if not (path / f).is_file()]
    if len(missing) < len(FILES):  # a checkpoint folder with files missing, not a run folder
        raise InputError(f"{path}: incomplete checkpoint, no {', '.join(missing)}")
    found = sorted(p for p in path.glob("step-*") if is_checkpoint(p))
    if not found:
        raise InputError(f"{path}: no complete checkpoint in this folder (a checkpoint folder holds {', '.join(FILES)})")
    return found[-1]


def read_run_info(folder) -> dict:
    """run.json beside a checkpoint: what was trained on what ({} when there is none)."""
    from engine.data import World

    path = Path(folder) / "run.json"
    if not path.is_file():
        return {}
    info = read_json(path)
    for name, types in RUN_INFO_TYPES.items():
        if name in info and not isinstance(info[name], types):
            raise InputError(f"{path}: {name} has the wrong type ({type(info[name]).__name__}: {info[name]!r})")
    if info.get("world") is not None:
        try:
            World(**info["world"])
        except TypeError:
            raise InputError(f"{path}: world has fields {sorted(info['world'])}; expected {sorted(World().to_dict())}") from None
        except InputError as err:
            raise InputError(f"{path}: world: {err}") from None
    return info


def load_checkpoint(path, device="cpu", backend="auto", with_trainer_state=False):
    """-> (model, tokenizer, trainer_state or None, checkpoint folder)."""
    folder = find_checkpoint(path)
    config = read_config(folder / "config.json")
    model = model_from_weights(config, read_safetensors(folder / "model.safetensors"), folder / "model.safetensors", backend)
    tokenizer = read_tokenizer(folder / "tokenizer.json")
    check_vocab(model, tokenizer, folder / "tokenizer.json")
    state = read_trainer_state(folder / "trainer_state.pt", model) if with_trainer_state else None
    return model.to(device), tokenizer, state, folder


def load_source(ckpt=None, hf=None, device="cpu", backend="auto"):
    """What --ckpt / --hf name -> (model, tokenizer or None, run_info, folder). An HF folder has
    no run_info ({}) and may have no tokenizer.json (None)."""
    if hf is None:
        model, tokenizer, _, folder = load_checkpoint(ckpt, device=device, backend=backend)
        return model, tokenizer, read_run_info(folder), folder
    from engine.hf import load_hf

    model, tokenizer = load_hf(hf, backend=backend)
    return model.to(device), tokenizer, {}, Path(hf)


# ---------------------------------------------------------------------------------------------
# Readers of files we did not write (ours or a Hugging Face folder): InputError naming the file.
# ---------------------------------------------------------------------------------------------
def read_config(path) -> GPTConfig:
    """Our own config.json."""
    fields = read_json(path)
    try:
        return GPTConfig.from_dict(fields)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def read_safetensors(path) -> dict:
    """name -> tensor, on the CPU."""
    path = Path(path)
    require_file(path)
    try:
        return load_file(path)
    except (OSError, SafetensorError) as err:
        raise InputError(f"{path}: not a readable safetensors file, or truncated ({reason(err)})") from None


def read_pickle(path):
    """torch.load of tensors and plain containers only: anything that would run code is refused."""
    path = Path(path)
    require_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. about the pickle protocol: what is wrong with the file is raised
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err):  # PyTorch's message advises weights_only=False: the one unsafe thing to do
            raise InputError(f"{path}: holds objects other than tensors and plain containers; refused, since "
                             "unpickling them could run code") from None
        raise InputError(f"{path}: not a readable PyTorch file ({reason(err)})") from None
    except Exception as err:  # a corrupt or truncated file fails as RuntimeError, EOFError, KeyError, ...
        raise InputError(f"{path}: not a readable PyTorch file, or truncated ({reason(err)})") from None


def check_vocab(model: GPT, tokenizer: Tokenizer, path):
    """Every id the tokenizer produces must have a row in the model's embedding table."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise InputError(f"{path}: {tokenizer.vocab_size} tokens, but the model has only "
                         f"{model.config.vocab_size} (vocab_size in config.json)")


def _few(names, n=6):
    return f"{names[:n]}{f' (+{len(names) - n} more)' if len(names) > n else ''}"


def model_from_weights(config: GPTConfig, weights: dict, source, backend: str = "auto") -> GPT:
    """A GPT of `config` holding `weights` (name -> tensor, our names), once they are checked
    against it: the same names and shapes, floating point. Nothing is allocated before that (the
    model is built on the meta device: a config.json can't ask for terabytes). Weights come out
    fp32, on the CPU.

    config.tie_embeddings decides what the head is. Tied: one table under two names, of which
    the file may hold either or both (both must then be equal: a file whose head differs from
    its token table is not the tied model its config.json says). Untied: two tables, both
    required, loaded as they are."""
    with torch.device("meta"):
        model = GPT(config, backend=backend)
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            what = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise InputError(f"{source}: {name} is {what}, expected floating-point weights")
    if config.tie_embeddings:
        tied = [weights[name] for name in TIED if name in weights]
        if len(tied) == 2 and (tied[0].shape != tied[1].shape or not torch.equal(*tied)):
            raise InputError(f"{source}: lm_head.weight differs from transformer.wte.weight, but the config makes "
                             "them one tied table (tie_embeddings / tie_word_embeddings true)")
        weights = {**weights, **dict.fromkeys(TIED, tied[0])} if tied else weights
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        found = ", ".join(f"{what} {_few(names)}" for what, names in (("missing", missing), ("unexpected", unexpected)) if names)
        raise InputError(f"{source}: the weights don't match the model config.json describes "
                         f"(n_layer={config.n_layer}, bias={config.bias}, tie_embeddings={config.tie_embeddings}): {found}")
    for name, tensor in expected.items():
        if weights[name].shape != tensor.shape:
            raise InputError(f"{source}: {name} has shape {list(weights[name].shape)}, but config.json "
                             f"makes it {list(tensor.shape)}")
    # fp32 copies where needed; an untied head that shares memory with the token table in the
    # file (a loader may hand both names one tensor) gets its own, so training moves them apart
    loaded = {n: t.float().contiguous() for n, t in weights.items()}
    if not config.tie_embeddings and loaded[TIED[1]].untyped_storage().data_ptr() == loaded[TIED[0]].untyped_storage().data_ptr():
        loaded[TIED[1]] = loaded[TIED[1]].clone()
    model.load_state_dict(loaded, assign=True)
    retie(model)
    return model


def retie(model: GPT) -> GPT:
    """A tied model's head is its token table again. load_state_dict(assign=True) puts two
    parameters where the tied model has one; an untied model keeps its two."""
    if model.config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model


def read_trainer_state(path, model: GPT) -> dict:
    """trainer_state.pt, checked against the model it resumes: what train() reads from it."""
    state = read_pickle(path)
    if not isinstance(state, dict) or not {"optimizer", "step", "rng_cpu"} <= set(state):
        raise InputError(f"{path}: expected a dict with optimizer, step and rng_cpu")
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise InputError(f"{path}: step must be a non-negative integer, got {state['step']!r}")
    for name in ("rng_cpu", "rng_cuda"):  # rng_cuda only from runs on a GPU
        rng = state.get(name)
        if name in state and not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.dim() == 1
                                  and (name != "rng_cpu" or rng.shape == torch.get_rng_state().shape)):
            raise InputError(f"{path}: {name} is not a random number generator state")
    optimizer = state["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"])):
        raise InputError(f"{path}: optimizer is not an optimizer state_dict")
    moments = optimizer["state"].values()
    if not all(isinstance(m, dict) and all(isinstance(m.get(k), torch.Tensor) and m[k].is_floating_point()
                                           for k in ("exp_avg", "exp_avg_sq")) for m in moments):
        raise InputError(f"{path}: the optimizer state lacks AdamW's moments (exp_avg, exp_avg_sq)")
    params = list(model.parameters())
    n_grouped = sum(len(g["params"]) for g in optimizer["param_groups"])
    shapes = Counter(tuple(m["exp_avg"].shape) for m in moments)
    if n_grouped != len(params) or shapes != Counter(tuple(p.shape) for p in params):
        raise InputError(f"{path}: the optimizer state is for another model than config.json describes "
                         f"({n_grouped} parameters; the model has {len(params)}, and its moments have other shapes)")
    return state
