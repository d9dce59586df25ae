"""Exponential moving average of parameters (LDM's LitEma, without module-attribute buffers)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class EMA:
    """Shadow copies of a module's trainable parameters, updated after each optimizer step."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {name: p.detach().clone().float()
                       for name, p in module.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        """Decay for this update: LitEma ramps it as (1+n)/(10+n) so early EMAs track fast."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, module: nn.Module, every: int = 1) -> None:
        """shadow <- d * shadow + (1 - d) * param, d = decay ** every when called every `every` steps."""
        decay = self.current_decay() ** every
        self.num_updates += 1
        names, params = zip(*((n, p) for n, p in module.named_parameters() if n in self.shadow))
        shadows = [self.shadow[n] for n in names]
        torch._foreach_lerp_(shadows, [p.detach().float() for p in params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into `module`."""
        for name, p in module.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily run `module` with the EMA weights (samples), restoring the live ones after."""
        saved = {n: p.detach().clone() for n, p in module.named_parameters() if n in self.shadow}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    if name in saved:
                        p.copy_(saved[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors; the update count travels as a tensor too."""
        state = {f"shadow.{n}": t for n, t in self.shadow.items()}
        state["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of state_dict; the parameter names must match exactly."""
        shadow = {k[len("shadow."):]: v for k, v in state.items() if k.startswith("shadow.")}
        if set(shadow) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(shadow))
            extra = sorted(set(shadow) - set(self.shadow))
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, t in shadow.items():
            self.shadow[name].copy_(t)
        self.num_updates = int(state["num_updates"])
