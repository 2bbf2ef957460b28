"""Where the model runs and in which precision: one rule each, for training, generation,
profiling and the benchmarks.

    device = pick_device("auto")          # cuda when a GPU is visible, else cpu
    with autocast_for(device):            # bf16 matmuls on CUDA over float32 weights; nothing on the CPU
        logits, _ = model(idx, cache=cache)
    KVCache(..., dtype=kv_cache_dtype(model))   # the dtype k and v come out in under that rule
"""
import contextlib

import torch

from engine.errors import InputError


def pick_device(name: str) -> torch.device:
    """--device auto | cpu | cuda -> a torch.device ("auto": cuda when a GPU is visible)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is visible (use --device cpu)")
    return torch.device(name)


def autocast_for(device):
    """bf16 autocast on CUDA (tensor cores; the weights stay float32); on other devices nothing
    changes, the model runs in its weights' dtype. The context manager can be entered again and
    again, so a loop can build it once."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def kv_cache_dtype(model) -> torch.dtype:
    """The dtype a KV cache for `model` holds: what k and v come out in under autocast_for
    (bf16 on CUDA, else the weights' dtype)."""
    weight = next(model.parameters())
    return torch.bfloat16 if weight.device.type == "cuda" else weight.dtype
