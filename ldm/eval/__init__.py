"""Evaluation as the field does it: FID, KID, IS, precision/recall, CLIP score, feature networks."""
from __future__ import annotations

from ldm.eval.errors import EvalError
from ldm.eval.frechet import feature_statistics, frechet_distance, frechet_distance_from_features
from ldm.eval.inception_score import inception_score
from ldm.eval.kid import kernel_inception_distance, mmd2_unbiased
from ldm.eval.precision_recall import precision_recall

__all__ = ["EvalError", "feature_statistics", "frechet_distance", "frechet_distance_from_features",
           "inception_score", "kernel_inception_distance", "mmd2_unbiased", "precision_recall"]
