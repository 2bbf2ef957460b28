"""Fused RMSNorm, and residual add + RMSNorm, in Triton: forward and backward.

    y = s * rstd * weight,  rstd = 1 / sqrt(mean(s^2) + eps),  over the last dim
    s = x                 (rms_norm)
    s = x + residual      (add_rms_norm: s is written once, for the residual stream)

The kernels are kernels/layernorm.py's, compiled with the constexpr RMS=True. RMSNorm is
LayerNorm with the mean fixed at 0 and no bias, so every difference is a line or two inside those
kernels: the forward skips the mean (the chunked path sums squares instead of merging Chan's
statistics) and stores only rstd; the backward's dx = rstd * (w*dy - xhat * mean(xhat * w*dy))
loses LayerNorm's mean(w*dy) term. Everything else is the same code, and is what makes a norm
kernel trustworthy: the launch tables (rows per program, warps, both backward layouts,
the chunked paths, each checked against register spills by kernels/compile.py), the launch grids checked
against CUDA's limits (kernels/launch.py), 64-bit row offsets, fp32 statistics whatever the input
dtype, the per-row rstd saved for the backward, and dweight summed deterministically (per-program
fp32 partial rows, then a reduction in a fixed order; no atomics). A second set of kernels would
copy all of that; a constexpr flag costs nothing at run time, since each value of RMS is its own
compiled build.

This module is the RMSNorm face: rms_norm, add_rms_norm, RMSNorm (a drop-in for torch.nn.RMSNorm)
and aot_configs(), the RMS builds for kernels/compile.py, made by the launchers themselves on meta
tensors like layernorm's. Its custom op is layernorm's too: llm_engine::norm with rms=True (a
torch.library custom_op, not a triton_op: kernels/launch.py's kernel_op says why).
"""
import math

import torch

from kernels import layernorm as _ln


def rms_norm(x, weight=None, eps=1e-6):
    """RMSNorm over the last dimension of x (any leading shape); weight optional. fp32, fp16, bf16;
    differentiable in x and weight."""
    return _ln._norm(x, None, weight, None, float(eps), True)[0]


def add_rms_norm(x, residual, weight=None, eps=1e-6):
    """(rms_norm(x + residual), x + residual) in one pass; differentiable in both outputs.
    residual: the residual stream; x: the branch output added to it."""
    y, s, _, _ = _ln._norm(x, residual, weight, None, float(eps), True)
    return y, s


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for torch.nn.RMSNorm (same arguments, parameters, state_dict keys, repr)."""

    def forward(self, x):
        shape = tuple(self.normalized_shape)
        if tuple(x.shape[-len(shape):]) != shape:
            raise ValueError(f"input's last dims must be {shape}, got shape {tuple(x.shape)}")
        # torch's default eps is the machine epsilon of the computation type: fp32 for every
        # dtype these kernels take.
        eps = self.eps if self.eps is not None else torch.finfo(torch.float32).eps
        # RMSNorm over the last k dims is RMSNorm over them flattened into one.
        n = math.prod(shape)
        weight = self.weight.reshape(n) if self.weight is not None else None
        return rms_norm(x.reshape(*x.shape[: x.dim() - len(shape)], n), weight, eps).view(x.shape)


def aot_configs() -> list[dict]:
    """RMSNorm's builds for kernels/compile.py: layernorm's launchers with rms=True, on meta
    tensors, every table entry per arch and dtype, N % 16 == 0 and not (labels "rms_*"; the
    partial-row reduction is the same build as LayerNorm's and keeps its "ln_bwd_reduce" label)."""
    return _ln.aot_configs(rms=True)
