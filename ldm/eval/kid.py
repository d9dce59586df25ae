"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs").

The unbiased estimator of MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets of both sets; the spread of the
subset values gives a standard error. Unbiased means E[KID] = 0 when both sets come from one
distribution, so values near or below zero are expected there (unlike FID's positive bias).
"""
from __future__ import annotations

import numpy as np

from ldm.eval.errors import EvalError


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3 for all pairs: [N, D] x [M, D] -> [N, M]."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3): diagonal terms left out of the within-set means."""
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, standard error) of the unbiased MMD^2 over `num_subsets` random subsets of each set."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise EvalError(f"KID needs features [N, D] of one width, got {list(real.shape)} and {list(fake.shape)}")
    smaller = min(real.shape[0], fake.shape[0])
    if smaller < 4:
        raise EvalError(f"KID needs at least 4 images per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    # A set smaller than the subset size gives subsets of half of it: whole-set subsets would all
    # be the same sample and their spread (the standard error) would be a meaningless 0.
    size = subset_size if smaller >= subset_size else smaller // 2
    rng = np.random.default_rng(seed)
    values = np.array([
        mmd2_unbiased(real[rng.choice(real.shape[0], size, replace=False)],
                      fake[rng.choice(fake.shape[0], size, replace=False)])
        for _ in range(num_subsets)])
    stderr = float(values.std(ddof=1) / np.sqrt(num_subsets)) if num_subsets > 1 else float("nan")
    return float(values.mean()), stderr
