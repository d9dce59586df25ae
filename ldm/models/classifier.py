"""A noise-aware classifier on latents for classifier guidance (Dhariwal & Nichol 2021, sec. 4).

The encoder half of a small U-Net (the U-Net's ResBlock with fewer norm groups, its
Downsample and sinusoidal timestep embedding), then GroupNorm-SiLU, global average pooling
and one linear head per attribute. It reads x_t at any (possibly fractional) timestep t, so its
gradient d log p(y | x_t) / d x_t can steer every sampler. The checkpoint is one safetensors
file whose metadata holds the architecture and the label names of every head, so the file
alone rebuilds the classifier.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.diffusion.classifier_guidance import classifier_guidance, log_prob_grad
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.schedule import Schedule
from ldm.errors import CheckpointError
from ldm.models.layers import GroupNormSiLU, timestep_embedding, zero_module
from ldm.models.unet import UNET_NORM_EPS, Downsample

METADATA_KEY = "latent_classifier_config"


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and heads: `labels` maps each attribute to its class names, in logit order."""
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    in_channels: int = 4
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    norm_groups: int = 8

    def __post_init__(self) -> None:
        if not self.labels or any(len(names) < 2 for names in self.labels.values()):
            raise ValueError("a classifier needs at least one attribute with >= 2 classes")
        object.__setattr__(self, "labels", {k: tuple(v) for k, v in self.labels.items()})
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        for ch in (self.model_channels * m for m in self.channel_mult):
            if ch % self.norm_groups:
                raise ValueError(f"{ch} channels are not divisible into {self.norm_groups} groups")


class ResBlock(nn.Module):
    """The U-Net's ResBlock (same keys and maths) with a choice of GroupNorm groups: the
    U-Net's 32 groups need >= 32 channels, a guidance classifier is smaller."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(GroupNormSiLU(channels, groups, eps=UNET_NORM_EPS), nn.Identity(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNormSiLU(out_channels, groups, eps=UNET_NORM_EPS), nn.Identity(), nn.Dropout(0.0),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.out_layers(h) + self.skip_connection(x)


class LatentClassifier(nn.Module):
    """logits per attribute for noisy latents: forward(x [B,C,H,W], t [B]) -> {name: [B, K]}."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        c = self.config = config
        mc, emb_dim = c.model_channels, 4 * c.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(c.in_channels, mc, 3, padding=1)
        blocks: list[nn.Module] = []
        ch = mc
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(ch, emb_dim, mult * mc, c.norm_groups))
                ch = mult * mc
            if level != len(c.channel_mult) - 1:
                blocks.append(Downsample(ch))
        self.blocks = nn.ModuleList(blocks)
        self.out_norm = GroupNormSiLU(ch, c.norm_groups, eps=UNET_NORM_EPS)
        self.heads = nn.ModuleDict({name: nn.Linear(ch, len(names)) for name, names in c.labels.items()})

    def forward(self, x: Tensor, t: Tensor) -> dict[str, Tensor]:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        pooled = self.out_norm(h).mean(dim=(2, 3))                      # [B, ch]
        return {name: head(pooled) for name, head in self.heads.items()}

    def parse_labels(self, spec: str) -> dict[str, int]:
        """{attribute: class index} from "color=red,shape=circle,bg=blue" (any subset)."""
        labels = self.config.labels
        allowed = "; ".join(f"{k}: {'|'.join(v)}" for k, v in labels.items())
        out: dict[str, int] = {}
        for part in spec.split(","):
            key, sep, value = (s.strip() for s in part.partition("="))
            if not sep or key not in labels or value not in labels[key] or key in out:
                raise ValueError(f"bad class {part.strip()!r} in {spec!r}: expected "
                                 f"attribute=name pairs separated by commas ({allowed})")
            out[key] = labels[key].index(value)
        return out


def save_classifier(model: LatentClassifier, path: str | Path) -> None:
    """Weights plus the config in the metadata (one file rebuilds the classifier)."""
    from safetensors.torch import save_file
    meta = asdict(model.config)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> LatentClassifier:
    """A classifier from its safetensors file; missing or unexpected keys are one error."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classifier checkpoint not found: {path}")
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # not a safetensors file: one line, never a traceback
        raise CheckpointError(f"{path}: not a readable classifier checkpoint ({err})") from None
    if METADATA_KEY not in meta:
        raise CheckpointError(f"{path}: no {METADATA_KEY} metadata (not a latent classifier)")
    model = LatentClassifier(ClassifierConfig(**json.loads(meta[METADATA_KEY])))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model.to(device).eval().requires_grad_(False)


def guide_with_classifier(denoiser: Denoiser, schedule: Schedule, path: str | Path, spec: str,
                          scale: float, device: str | torch.device, channels: int) -> Denoiser:
    """`denoiser` with classifier guidance toward `spec` ("color=red,shape=circle") by the
    classifier stored at `path` (ldm.diffusion.classifier_guidance)."""
    model = load_classifier(path, device)
    if model.config.in_channels != channels:
        raise CheckpointError(f"classifier {path} reads {model.config.in_channels}-channel "
                              f"latents, this model's have {channels}")
    grad = log_prob_grad(model, model.parse_labels(spec))
    return classifier_guidance(denoiser, grad, schedule, scale)
