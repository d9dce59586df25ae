"""Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

Each set's manifold is the union of balls around its samples, with radius the distance to
the k-th nearest other sample of the same set (k = 3 in the paper). Precision is the share of
fake samples inside the real manifold (fidelity); recall the share of real samples inside the
fake manifold (coverage).
"""
from __future__ import annotations

import numpy as np

from ldm.eval.errors import EvalError

_ROWS = 1024  # pairwise distances are computed in blocks of rows to bound memory


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [N, M] (squared form clipped at 0 against round-off)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(sq, 0.0, None))


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance from each sample to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = np.empty(features.shape[0])
    for start in range(0, features.shape[0], _ROWS):
        block = _pairwise(features[start:start + _ROWS], features)
        # Column 0 of the sorted row is the sample itself (distance 0), so index k is the k-th other.
        radii[start:start + _ROWS] = np.partition(block, k, axis=1)[:, k]
    return radii


def coverage_of(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Share of `queries` within radii[i] of some manifold sample i."""
    inside = 0
    for start in range(0, queries.shape[0], _ROWS):
        block = _pairwise(queries[start:start + _ROWS], manifold)
        inside += int((block <= radii[None, :]).any(axis=1).sum())
    return inside / queries.shape[0]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of fake features [M, D] against real features [N, D]."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise EvalError(f"precision/recall needs features [N, D] of one width, "
                        f"got {list(real.shape)} and {list(fake.shape)}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise EvalError(f"precision/recall with k={k} needs at least {k + 1} images per set, "
                        f"got {real.shape[0]} real and {fake.shape[0]} fake")
    precision = coverage_of(real, knn_radii(real, k), fake)
    recall = coverage_of(fake, knn_radii(fake, k), real)
    return precision, recall
