"""The `shapes` feature network: a small CNN classifier of (colour, shape, background) triples.

Inception features mean little on 64x64 synthetic shapes, and their weights are not shipped.
This network, trained on the shapes data set by scripts/train_shapes_features.py, gives
features (the pooled last convolution) and class probabilities (168 triples) for the same
FID / KID / IS / precision-recall formulas; results are named shapes-FID etc., never FID.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.data.shapes import all_triples
from ldm.eval.errors import EvalError

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "shapes_features.safetensors"
INPUT_SIZE = 64           # the shapes data set's native size
WIDTHS = (16, 32, 64, 64)  # channels per stride-2 stage: 64 -> 32 -> 16 -> 8 -> 4 pixels
# The features are a 16-wide linear bottleneck: FID's covariance is then full rank from 17
# images on, small enough for a CPU to generate per cell (the domain has few factors: two
# colours, a shape, a position and a size).
FEATURE_DIM = 16
NUM_CLASSES = len(all_triples())


class ShapesFeatureNet(nn.Module):
    """Four stride-2 conv stages, global average pool, linear bottleneck (the features), classifier."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS, num_classes: int = NUM_CLASSES,
                 feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        self.body = nn.Sequential(*layers)
        self.bottleneck = nn.Linear(channels, feature_dim)
        self.classifier = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))
        self.widths, self.num_classes, self.dim = tuple(widths), num_classes, feature_dim
        # The features are standardised with the training set's per-dimension mean and std: the
        # raw bottleneck has values in the tens, which the cubic KID kernel (x.y / d + 1)^3 turns
        # into numbers of order 1e6 with huge variance; Inception's pool features are of order 1.
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, 3, 64, 64] in [-1, 1] -> (standardised features [B, D], logits [B, K])."""
        raw = self.bottleneck(self.body(x).mean(dim=(2, 3)))
        return (raw - self.feature_mean) / self.feature_std, self.classifier(raw)


def to_input(images: np.ndarray) -> Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, 64, 64] in [-1, 1] (bilinear, antialiased, if resized)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                          align_corners=False)
    return x


def save_shapes_features(net: ShapesFeatureNet, path: str | Path, note: str = "") -> None:
    """Weights as fp32 safetensors with the architecture in the metadata."""
    from safetensors.torch import save_file

    meta = {"shapes_features": json.dumps({"widths": list(net.widths), "num_classes": net.num_classes,
                                          "feature_dim": net.dim}),
            "note": note}
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(path), metadata=meta)


def load_shapes_features(path: str | Path | None = None) -> ShapesFeatureNet:
    """The trained network (default: the shipped asset), in eval mode."""
    from safetensors import safe_open

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise EvalError(f"shapes feature weights not found: {path} "
                        f"(make them with scripts/train_shapes_features.py)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["shapes_features"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - any unreadable file is one user-facing error
        raise EvalError(f"cannot read shapes feature weights {path}: {err}") from None
    net = ShapesFeatureNet(tuple(meta["widths"]), meta["num_classes"], meta["feature_dim"])
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise EvalError(f"shapes feature weights {path} do not match the network: "
                        f"{' '.join(str(err).split())}") from None
    return net.eval().requires_grad_(False)


class ShapesExtractor:
    """Features [N, D] and class probabilities [N, 168] of the shapes network."""

    name = "shapes"
    metric_prefix = "shapes-"
    native_size = INPUT_SIZE

    def __init__(self, path: str | Path | None = None, batch_size: int = 256) -> None:
        self.net = load_shapes_features(path)
        self.dim = self.net.dim
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, 3] (one size) -> (features, probabilities)."""
        feats, probs = [], []
        for start in range(0, len(images), self.batch_size):
            f, logits = self.net(to_input(images[start:start + self.batch_size]))
            feats.append(f.double().numpy())
            probs.append(torch.softmax(logits.double(), dim=1).numpy())
        return np.concatenate(feats), np.concatenate(probs)
