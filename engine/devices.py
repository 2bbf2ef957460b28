"""Where the model runs and in which precision: one rule each, for training, generation,
profiling and the benchmarks.

    device = pick_device("auto")          # cuda when a GPU is visible, else cpu
    with autocast_for(device):            # bf16 matmuls on CUDA over float32 weights; nothing on the CPU
        logits, _ = model(idx, cache=cache)
    KVCache(..., dtype=kv_cache_dtype(model))   # the dtype k and v come out in under that rule
    advise_huge_pages(tensor)             # back a big, untouched CPU buffer with 2 MB pages (Linux)
"""
import contextlib
import ctypes
import sys

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


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back a CPU tensor's memory with 2 MB pages (transparent huge pages, which
    distributions leave to madvise), for the whole 2 MB-aligned part of it; call it before the
    memory is first written. Returns whether the kernel took the advice (False elsewhere).

    For the KV cache: a decode step streams all of it, and with 4 KB pages it takes a TLB miss
    every 4 KB and a page fault each time a row's keys cross into a new page. Measured on the
    6x192 model at batch 64 on this 2-vCPU VM, in-process A/B over 6 generations: decode step
    12.4 vs 13.6 ms on one thread, 9.5 vs 11.5 on two; prompt to last token 1446 vs 1608 ms (the
    very first huge pages a process gets cost more on this VM: the host backs them on first use).
    The price: a 2 MB page is resident once any byte of it is written, and the prefill writes a
    little of every row, so the whole cache is in memory from the start (with 4 KB pages, the
    columns a generation that stops early never reaches would not be)."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (t.data_ptr() + t.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end <= start:
        return False
    libc = ctypes.CDLL(None)
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE) == 0
