"""The standard FID/KID/IS features: torch-fidelity's InceptionV3 with the 2015-12-05 weights.

torch-fidelity is used rather than torchmetrics because torchmetrics' FID itself wraps
torch-fidelity's extractor: one dependency instead of two, with the same numbers. Its network
reproduces the TensorFlow graph of the original FID code (TF1-style bilinear resize of every
image to 299x299 inside the network), so scores are comparable with published ones. The
weights are only read from a local file; nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ldm.eval.errors import EvalError

WEIGHTS_ENV = "LDM_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"


def inception_weights_path(flag: str | None) -> Path | None:
    """The weights file from the flag, else the environment variable, else None."""
    value = flag or os.environ.get(WEIGHTS_ENV)
    return Path(value) if value else None


def missing_weights_message() -> str:
    """One line: which file Inception features need and where it is published."""
    return (f"Inception features need the pt_inception-2015-12-05 weights file {WEIGHTS_FILE}, "
            f"published at {WEIGHTS_URL}; pass --inception-weights PATH or set {WEIGHTS_ENV}")


class InceptionExtractor:
    """pool3 features [N, 2048] and class probabilities [N, 1008] of InceptionV3."""

    name = "inception"
    metric_prefix = ""
    native_size = None  # the network resizes every input to 299x299 itself

    def __init__(self, weights: str | Path, batch_size: int = 32) -> None:
        weights = Path(weights)
        if not weights.is_file():
            raise EvalError(f"Inception weights not found: {weights}. " + missing_weights_message())
        # torch-fidelity reads the file with weights_only=False; reading it first with
        # weights_only=True proves it holds only tensors, so loading it cannot execute code.
        try:
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is one user-facing error
            raise EvalError(f"cannot read Inception weights {weights}: {str(err).splitlines()[0]}") from None
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise EvalError("Inception features need the torch-fidelity package "
                            "(pip install -r requirements.txt)") from None
        # 'logits_unbiased' are the logits without the fc bias, as torch-fidelity's IS uses.
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights))
        self.dim = 2048
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, 3] (one size) -> (features, probabilities)."""
        feats, probs = [], []
        for start in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size])).permute(0, 3, 1, 2)
            f, logits = self.net(x.contiguous())
            feats.append(f.double().numpy())
            probs.append(torch.softmax(logits.double(), dim=1).numpy())
        return np.concatenate(feats), np.concatenate(probs)
