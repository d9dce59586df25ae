"""The evaluation maths: Frechet distance, KID, Inception Score, precision/recall."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from ldm.eval import (
    EvalError, feature_statistics, frechet_distance, inception_score, kernel_inception_distance,
    mmd2_unbiased, precision_recall,
)


def random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    """A random symmetric positive (semi-)definite matrix."""
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root of S1 S2."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("d", [1, 5, 64])
def test_frechet_matches_scipy_sqrtm(d: int) -> None:
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)


def test_frechet_diagonal_closed_form() -> None:
    # Commuting covariances: Tr((S1 S2)^(1/2)) = sum sqrt(a_i b_i), so
    # d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_identical_and_singular() -> None:
    rng = np.random.default_rng(1)
    mu, s = rng.standard_normal(8), random_spd(rng, 8, rank=3)  # rank-deficient covariance
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-10)
    s2 = random_spd(rng, 8, rank=3)
    value = frechet_distance(mu, s, mu, s2)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(scipy_frechet(mu, s, mu, s2), rel=1e-5, abs=1e-6)


def test_frechet_shape_mismatch() -> None:
    with pytest.raises(EvalError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics() -> None:
    x = np.random.default_rng(2).standard_normal((500, 4))
    mu, sigma = feature_statistics(x)
    assert mu.shape == (4,) and sigma.shape == (4, 4)
    np.testing.assert_allclose(sigma, np.cov(x.T))


def test_kid_unbiased_on_one_distribution() -> None:
    # E[MMD^2_u] = 0 for two samples of one distribution: the mean over many independent
    # repeats must sit within a few standard errors of 0 (a biased V-statistic would not).
    rng = np.random.default_rng(3)
    values = np.array([mmd2_unbiased(rng.standard_normal((40, 8)), rng.standard_normal((40, 8)))
                       for _ in range(300)])
    assert abs(values.mean()) < 4 * values.std(ddof=1) / np.sqrt(len(values))
    assert (values < 0).any()  # an unbiased estimator of a zero quantity must go below zero


def test_kid_detects_shift_and_reports_stderr() -> None:
    rng = np.random.default_rng(4)
    real = rng.standard_normal((300, 16))
    same, se_same = kernel_inception_distance(real, rng.standard_normal((300, 16)), 50, 100)
    shifted, se_shift = kernel_inception_distance(real, rng.standard_normal((300, 16)) + 1.0, 50, 100)
    assert abs(same) < 3 * se_same + 1e-3
    assert shifted > 10 * se_shift and shifted > 0.1
    assert se_same > 0


def test_kid_polynomial_kernel_by_hand() -> None:
    x, y = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 1.0], [0.0, 0.0]])
    k = lambda a, b: (a @ b / 2 + 1) ** 3  # noqa: E731 - the kernel as in the paper
    expected = (2 * k(x[0], x[1])) / 2 + (2 * k(y[0], y[1])) / 2 - 2 * np.mean(
        [k(a, b) for a in x for b in y])
    assert mmd2_unbiased(x, y) == pytest.approx(expected)


def test_inception_score_bounds() -> None:
    k = 10
    assert inception_score(np.full((50, k), 1.0 / k))[0] == pytest.approx(1.0)
    onehot = np.eye(k)[np.arange(100) % k]  # confident and balanced
    assert inception_score(onehot)[0] == pytest.approx(k)
    assert inception_score(np.eye(k)[np.zeros(100, int)])[0] == pytest.approx(1.0)  # one class only


def test_inception_score_splits() -> None:
    onehot = np.eye(4)[np.arange(80) % 4]
    mean, std = inception_score(onehot, splits=4)
    assert mean == pytest.approx(4.0) and std == pytest.approx(0.0, abs=1e-12)


def test_precision_recall_identical() -> None:
    x = np.random.default_rng(5).standard_normal((200, 5))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_disjoint() -> None:
    rng = np.random.default_rng(6)
    real = rng.standard_normal((100, 5))
    assert precision_recall(real, rng.standard_normal((100, 5)) + 100.0) == (0.0, 0.0)


def test_precision_recall_subset() -> None:
    # Two far-apart clusters of real samples; the fake set covers only one cluster: every fake
    # sample is realistic (precision 1) but only half the real samples are covered (recall 1/2).
    rng = np.random.default_rng(7)
    real = np.concatenate([rng.standard_normal((100, 3)), rng.standard_normal((100, 3)) + 50.0])
    fake = real[:100] + 0.01 * rng.standard_normal((100, 3))
    precision, recall = precision_recall(real, fake)
    assert precision == 1.0
    assert recall == pytest.approx(0.5, abs=0.03)


def test_precision_recall_too_few() -> None:
    with pytest.raises(EvalError, match="at least 4"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


def test_kid_small_sets_use_half_subsets() -> None:
    rng = np.random.default_rng(8)
    mean, stderr = kernel_inception_distance(rng.standard_normal((20, 4)), rng.standard_normal((30, 4)), 20, 1000)
    assert stderr > 0 and np.isfinite(mean)
    with pytest.raises(EvalError, match="at least 4"):
        kernel_inception_distance(np.zeros((3, 2)), np.zeros((10, 2)))
