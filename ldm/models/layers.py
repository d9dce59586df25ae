"""Building blocks shared by the U-Net and the autoencoder."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ldm.kernels import group_norm_silu


class GroupNormSiLU(nn.Module):
    """GroupNorm (fp32 statistics) optionally followed by SiLU, through the fused kernel.

    Parameters are named `weight`/`bias` like nn.GroupNorm so SD state-dict keys map 1:1.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5,
                 silu: bool = True) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"{num_channels} channels are not divisible into {num_groups} groups")
        self.num_channels, self.num_groups, self.eps, self.silu = num_channels, num_groups, eps, silu
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, groups={self.num_groups}, eps={self.eps}, "
                f"silu={self.silu}")


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (SD starts residual branches at the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps: [B] -> [B, dim]."""
    half = dim // 2
    # frequencies exp(-ln(max_period) * i / half), i = 0..half-1 (as SD's openaimodel)
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
