"""LPIPS (Zhang et al. 2018, VGG16 variant) built from weights already on disk, never downloaded."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.errors import LdmError

_VGG_FILE = "vgg16-397923af.pth"          # torchvision's VGG16 weights file name
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # relu1_2 .. relu5_3
_CHANNELS = (64, 128, 256, 512, 512)
# The input scaling LPIPS applies to images in [-1, 1] (lpips.pretrained_networks.ScalingLayer)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPSUnavailable(LdmError):
    """Perceptual loss requested but its weights are not on this machine."""


def _default_vgg_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / _VGG_FILE


class LPIPS(nn.Module):
    """Frozen perceptual distance [B, 1, 1, 1] between images in [-1, 1]."""

    def __init__(self, vgg_path: str = "", lin_path: str = "") -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers
        vgg_file = Path(vgg_path) if vgg_path else _default_vgg_path()
        if not vgg_file.is_file():
            raise LPIPSUnavailable(
                f"loss.perceptual_weight > 0 needs VGG16 weights at {vgg_file} (not downloaded); "
                "set loss.lpips_vgg_path, or loss.perceptual_weight=0")
        if not lin_path or not Path(lin_path).is_file():
            raise LPIPSUnavailable(
                f"loss.perceptual_weight > 0 needs the LPIPS linear weights (vgg.pth); "
                f"loss.lpips_lin_path={lin_path!r} is not a file; or set loss.perceptual_weight=0")
        # Only VGG16's conv trunk is needed: skip building its 120M-parameter classifier.
        features = make_layers(cfgs["D"])
        state = torch.load(vgg_file, map_location="cpu", weights_only=True)
        features.load_state_dict({k[len("features."):]: v for k, v in state.items()
                                  if k.startswith("features.")})
        self.slices = nn.ModuleList(features[a:b] for a, b in _SLICES)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        lin_state = torch.load(lin_path, map_location="cpu", weights_only=True)
        for i, lin in enumerate(self.lins):
            lin.weight.data.copy_(lin_state[f"lin{i}.model.1.weight"])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h_x, h_y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = 0.0
        for block, lin in zip(self.slices, self.lins):
            h_x, h_y = block(h_x), block(h_y)
            # unit-normalise each feature vector over channels, then a learned channel weighting
            n_x = h_x / (h_x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            n_y = h_y / (h_y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((n_x - n_y).pow(2)).mean(dim=(2, 3), keepdim=True)
        return total
