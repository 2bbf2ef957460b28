"""engine.devices: the device choice, the two precision rules everything else uses, huge pages."""
from pathlib import Path

import pytest
import torch

from engine import GPT, GPTConfig
from engine.devices import advise_huge_pages, autocast_for, kv_cache_dtype, pick_device
from engine.errors import InputError


def test_pick_device_names_the_flag_on_bad_input():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="--device must be auto, cpu or cuda, got 'gpu'"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            pick_device("cuda")


def test_on_the_cpu_the_model_runs_in_its_weights_dtype():
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)).double()
    autocast = autocast_for("cpu")
    for _ in range(2):  # built once, entered again and again (as the training loop does)
        with autocast:
            logits, _ = model(torch.zeros(1, 4, dtype=torch.long))
    assert logits.dtype == torch.float64 == kv_cache_dtype(model)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_matmuls_and_the_kv_cache_are_bf16():
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)).cuda()
    with autocast_for("cuda"):
        y = model.lm_head(torch.zeros(2, 8, device="cuda"))
    assert y.dtype == torch.bfloat16 == kv_cache_dtype(model)


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP_MODE.exists() or "[never]" in THP_MODE.read_text(),
                    reason="needs Linux with transparent huge pages not set to never")
def test_the_kv_cache_asks_for_huge_pages_and_keeps_its_values():
    """Both halves of a KV cache big enough to hold a 2 MB page are advised (the kernel marks
    the mapping "hg"); a tensor under 2 MB is left alone; the cache's values are kept."""
    from engine.generate import KVCache

    config = GPTConfig.from_preset("tiny", n_layer=2)
    cache = KVCache(config, 16, 256, "cpu", torch.float32)  # 2 x 16 x 4 x 256 x 32 floats: 4 MB each
    for t in (cache.k, cache.v):
        address = -(-t.data_ptr() // (2 << 20)) * (2 << 20)
        assert "hg" in _vm_flags(address)
    cache.k.fill_(1.5)
    assert cache.k.sum().item() == 1.5 * cache.k.numel()
    assert not advise_huge_pages(torch.empty(1000))  # under 2 MB: nothing to advise
    assert advise_huge_pages(torch.empty(4 << 20, dtype=torch.uint8))  # 4 MB hold a 2 MB-aligned 2 MB wherever they start
