"""Python face of the fused ops in `ldm._C` (each beside its reference implementation)."""
from ldm.kernels.attention import attention_reference, flash_attention
from ldm.kernels.group_norm_silu import group_norm_silu, group_norm_silu_reference
from ldm.kernels.sampler_step import sampler_step, sampler_step_reference, step_coefficients
from ldm.prediction import PredictionType

__all__ = ["flash_attention", "attention_reference", "group_norm_silu", "group_norm_silu_reference", "sampler_step",
           "sampler_step_reference", "step_coefficients", "PredictionType"]
