"""Bitwise-equal gradients over 3 runs on a GPU, in bf16 at sizes where many programs share each
reduction. The GPU suite's targets table finds these tests by name: keep "bitwise" in them, and
"attention" or "layernorm"."""
import pytest
import torch

import kernels

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RUNS = 3


def gradients_of_runs(fn, shapes: list[tuple], device: str, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """The gradients of fn's inputs (random, of `shapes`) for the same output gradients, RUNS times."""
    inputs = [torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grad_outputs = [torch.randn_like(o) for o in outputs]
    return [torch.autograd.grad(fn(*inputs), inputs, grad_outputs) for _ in range(RUNS)]


def assert_bitwise_equal(runs: list[tuple[torch.Tensor, ...]]):
    first, *others = runs
    for run, grads in enumerate(others, start=2):
        for i, (a, b) in enumerate(zip(first, grads)):
            assert torch.equal(a, b), f"gradient of input {i}: run {run} differs from run 1"


def attend(q, k, v):
    return kernels.flash_attention(q, k, v, causal=True, deterministic=True)


def test_attention_gradients_bitwise_equal_over_3_runs():
    assert_bitwise_equal(gradients_of_runs(attend, [(2, 16, 2048, 128)] * 3, "cuda", torch.bfloat16))


def test_layernorm_gradients_bitwise_equal_over_3_runs():
    m, n = 32768, 1024
    assert_bitwise_equal(gradients_of_runs(kernels.add_layer_norm, [(m, n), (m, n), (n,), (n,)], "cuda", torch.bfloat16))
