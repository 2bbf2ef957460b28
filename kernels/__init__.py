"""Triton kernels, importable on their own (nothing here imports `engine`).

    from kernels import flash_attention, layer_norm, add_layer_norm, LayerNorm
    from kernels import rms_norm, add_rms_norm, RMSNorm, apply_rope, swiglu
    from kernels import linear_cross_entropy
    from kernels import sample, row_params    # the decode draw on the device (engine.device_sampling)
"""
from kernels.attention import flash_attention
from kernels.linear_cross_entropy import linear_cross_entropy
from kernels.layernorm import LayerNorm, add_layer_norm, layer_norm
from kernels.rmsnorm import RMSNorm, add_rms_norm, rms_norm
from kernels.rope import apply_rope
from kernels.sampling import row_params, sample
from kernels.swiglu import swiglu
