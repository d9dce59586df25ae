"""The fused ops under torch.compile(fullgraph=True) on the CPU (needs their fake kernels)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm._extension import fused_device_types
from ldm.kernels import group_norm_silu, group_norm_silu_reference, sampler_step, \
    sampler_step_reference, step_coefficients

pytestmark = pytest.mark.skipif("cpu" not in fused_device_types("group_norm_silu"),
                                reason="ldm._C is not built")


class TinyStep(nn.Module):
    """Conv -> GroupNorm+SiLU -> conv as a 'model output', then one guided sampler step."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.norm_weight = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.norm_bias = nn.Parameter(torch.linspace(-0.2, 0.2, 8))
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, coeffs: torch.Tensor, noise: torch.Tensor):
        norm = group_norm_silu if self.fused else group_norm_silu_reference
        step = sampler_step if self.fused else sampler_step_reference
        h = norm(self.conv_in(torch.cat([x, x])), 4, self.norm_weight, self.norm_bias)
        x_next, denoised = step(x, self.conv_out(h), coeffs, noise)
        return x_next, denoised, h


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = TinyStep(fused=True)
    reference = TinyStep(fused=False)
    reference.load_state_dict(model.state_dict())
    x, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    coeffs = step_coefficients(a=0.8, s=0.6, guidance_scale=5.0, c_x0=0.9, c_eps=0.4, c_noise=0.1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x, coeffs, noise)
    want = reference(x, coeffs, noise)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # Gradients flow through the compiled graph's fused GroupNorm backward.
    (got[2] * torch.arange(8.0).view(1, 8, 1, 1)).sum().backward()
    (want[2] * torch.arange(8.0).view(1, 8, 1, 1)).sum().backward()
    torch.testing.assert_close(model.norm_weight.grad, reference.norm_weight.grad,
                               atol=1e-4, rtol=1e-4)
