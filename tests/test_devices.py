"""engine.devices: the device choice and the two precision rules everything else uses."""
import pytest
import torch

from engine import GPT, GPTConfig
from engine.devices import autocast_for, kv_cache_dtype, pick_device
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
