"""All distribution metrics of one real/fake pair of image sets, through one feature network."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ldm.eval.errors import EvalError
from ldm.eval.frechet import frechet_distance_from_features
from ldm.eval.images import group_by_size
from ldm.eval.inception_score import inception_score
from ldm.eval.kid import kernel_inception_distance
from ldm.eval.precision_recall import precision_recall


class Extractor(Protocol):
    """A feature network: uint8 [N, H, W, 3] of one size -> (features [N, D], probabilities [N, K])."""

    name: str
    metric_prefix: str
    dim: int

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def extract(extractor: Extractor, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Features and probabilities of images of any sizes, in input order (one batch per size)."""
    feats, probs = [None] * len(images), [None] * len(images)
    for indices in group_by_size(images).values():
        f, p = extractor(np.stack([images[i] for i in indices]))
        for row, i in enumerate(indices):
            feats[i], probs[i] = f[row], p[row]
    return np.stack(feats), np.stack(probs)


def check_counts(extractor: Extractor, n_real: int, n_fake: int) -> None:
    """FID's covariance of D-dimensional features is full rank only from D + 1 images on."""
    need = extractor.dim + 1
    if min(n_real, n_fake) < need:
        raise EvalError(f"{extractor.metric_prefix}FID with {extractor.dim}-dimensional {extractor.name} "
                        f"features needs at least {need} images per set, got {n_real} real and {n_fake} fake")


def distribution_metrics(real: np.ndarray, fake: np.ndarray, fake_probs: np.ndarray,
                         kid_subsets: int = 100, kid_subset_size: int = 1000, k: int = 3) -> dict[str, float]:
    """FID, KID (mean and standard error), IS of the fake set, precision and recall."""
    kid, kid_se = kernel_inception_distance(real, fake, kid_subsets, kid_subset_size)
    is_mean, is_std = inception_score(fake_probs)
    precision, recall = precision_recall(real, fake, k)
    return {"fid": frechet_distance_from_features(real, fake), "kid": kid, "kid_stderr": kid_se,
            "is": is_mean, "precision": precision, "recall": recall,
            "num_real": int(real.shape[0]), "num_fake": int(fake.shape[0])}
