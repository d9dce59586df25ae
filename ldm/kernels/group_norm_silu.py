"""GroupNorm (+ SiLU) with fp32 statistics: reference and fused op."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm._extension import has_extension


def group_norm_silu_reference(x: Tensor, num_groups: int, weight: Tensor | None = None,
                              bias: Tensor | None = None, eps: float = 1e-5,
                              silu: bool = True) -> Tensor:
    """F.silu(F.group_norm(x.float(), ...)).to(x.dtype): the semantics the fused op matches."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.group_norm(x.float(), num_groups, w, b, eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def group_norm_silu(x: Tensor, num_groups: int, weight: Tensor | None = None,
                    bias: Tensor | None = None, eps: float = 1e-5, silu: bool = True) -> Tensor:
    """GroupNorm over (N, C, *spatial) then optional SiLU; fused when ldm._C is built."""
    # TODO(kernels): dispatch to torch.ops.ldm.group_norm_silu with autograd once the kernels land.
    return group_norm_silu_reference(x, num_groups, weight, bias, eps, silu)
