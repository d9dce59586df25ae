"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), from class probabilities."""
from __future__ import annotations

import numpy as np

from ldm.eval.errors import EvalError


def inception_score(probs: np.ndarray, splits: int = 1) -> tuple[float, float]:
    """(mean, std over `splits` equal chunks) of the IS of probabilities [N, K] (rows sum to 1)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] < splits or splits < 1:
        raise EvalError(f"IS needs probabilities [N >= splits, K], got {list(probs.shape)} with {splits} splits")
    scores = []
    for chunk in np.array_split(probs, splits):
        marginal = chunk.mean(axis=0, keepdims=True)           # p(y) over this chunk
        # 0 log 0 = 0: classes with p(y|x) = 0 add nothing to the KL.
        logs = np.log(np.where(chunk > 0, chunk, 1.0)) - np.log(np.where(marginal > 0, marginal, 1.0))
        scores.append(np.exp((chunk * logs).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))
