"""Frechet distance between two Gaussians fitted to feature sets (FID, Heusel et al. 2017).

d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
Tr((S1 S2)^(1/2)) equals Tr((A S2 A)^(1/2)) with A = S1^(1/2) (the two matrices are similar),
and A S2 A is symmetric positive semi-definite, so both square roots come from symmetric
eigendecompositions in float64: no complex parts and no Schur iterations to diverge.
"""
from __future__ import annotations

import numpy as np

from ldm.eval.errors import EvalError


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D]."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise EvalError(f"need features [N >= 2, D], got shape {list(features.shape)}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    matrix = (matrix + matrix.T) / 2.0
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise EvalError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, "
                        f"sigma {sigma1.shape} / {sigma2.shape}")
    root1 = psd_sqrt(sigma1)
    middle = psd_sqrt(root1 @ sigma2 @ root1)                  # similar to (S1 S2)^(1/2)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(middle)
    return float(max(value, 0.0))  # exact maths is >= 0; clip float round-off at identical inputs


def frechet_distance_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID-style distance between two feature sets [N, D] and [M, D]."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))
