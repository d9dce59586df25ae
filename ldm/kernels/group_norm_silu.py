"""GroupNorm (+ SiLU) with fp32 statistics: reference and fused op."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm._extension import exporting, fused_device_types, has_extension

# Device types with a compiled kernel: a fact of the build, fixed once ldm._C is loaded
# (a constant, so torch.compile folds the dispatch choice).
_FUSED_DEVICES = fused_device_types("group_norm_silu")


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
    if x.device.type in _FUSED_DEVICES and not exporting():
        return torch.ops.ldm.group_norm_silu(x, num_groups, weight, bias, eps, silu)[0]
    return group_norm_silu_reference(x, num_groups, weight, bias, eps, silu)


def _stats_dtype(x: Tensor) -> torch.dtype:
    """fp32 statistics, except fp64 for fp64 inputs (as the kernels do)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_inputs(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None) -> None:
    """The kernels' input checks, for fake tensors (torch.compile) and mixed-device calls."""
    torch._check(3 <= x.dim() <= 5, lambda: f"ldm::group_norm_silu: x must be (N, C, *spatial) "
                 f"with 1 to 3 spatial dims, got shape {tuple(x.shape)}")
    torch._check(num_groups > 0 and x.shape[1] % num_groups == 0,
                 lambda: f"ldm::group_norm_silu: channels ({x.shape[1]}) must be divisible by "
                 f"num_groups ({num_groups})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            torch._check(t.dim() == 1 and t.shape[0] == x.shape[1],
                         lambda: f"ldm::group_norm_silu: {name} must have shape [{x.shape[1]}], "
                         f"got {tuple(t.shape)}")
            torch._check(t.device == x.device, lambda: f"ldm::group_norm_silu: {name} is on "
                         f"{t.device} but x is on {x.device}")


def _fake_forward(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                  eps: float, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Shapes of (y, mean, rstd): y keeps x's memory format; stats are [N, num_groups]."""
    _check_inputs(x, num_groups, weight, bias)
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stats_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _fake_backward(grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None,
                   bias: Tensor | None, num_groups: int, silu: bool,
                   output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Shapes of (dx, dweight, dbias); an output not asked for is an empty [0] tensor."""
    dx = torch.empty_like(x) if output_mask[0] else x.new_empty(0)
    dw = torch.empty_like(weight) if weight is not None and output_mask[1] else x.new_empty(0)
    db = torch.empty_like(bias) if bias is not None and output_mask[2] else x.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    """Save what the fused backward needs (x, the fp32 statistics, weight and bias)."""
    x, num_groups, weight, bias, _eps, silu = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.num_groups, ctx.silu = num_groups, silu
    # mean/rstd are statistics, not differentiable outputs: using them in a loss raises
    # instead of silently getting no gradient, and no zero gradients are built for them.
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y: Tensor, _grad_mean: Tensor, _grad_rstd: Tensor) -> tuple:
    """Gradients of (x, num_groups, weight, bias, eps, silu) through the fused backward op."""
    x, mean, rstd, weight, bias = ctx.saved_tensors
    if grad_y is None:  # y did not reach the loss (grads are not materialised)
        return None, None, None, None, None, None
    mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[2],
            bias is not None and ctx.needs_input_grad[3]]
    dx, dw, db = torch.ops.ldm.group_norm_silu_backward(
        grad_y, x, mean, rstd, weight, bias, ctx.num_groups, ctx.silu, mask)
    return (dx if mask[0] else None, None, dw if mask[1] else None, db if mask[2] else None,
            None, None)


if has_extension():
    torch.library.register_fake("ldm::group_norm_silu")(_fake_forward)
    torch.library.register_fake("ldm::group_norm_silu_backward")(_fake_backward)
    torch.library.register_autograd("ldm::group_norm_silu", _backward,
                                    setup_context=_setup_context)
