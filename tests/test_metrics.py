"""FID, KID, IS, precision/recall and density/coverage against NumPy/SciPy computations from the definitions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from genlab.errors import GenlabError
from genlab.eval import metrics as M


def _features(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    a = np.random.default_rng(1234 + d).normal(size=(d, d)) / np.sqrt(d)  # one correlation structure per d
    return (np.random.default_rng(seed).normal(size=(n, d)) @ a) * scale + shift


def _fid_scipy(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.3, 1.0), (0.0, 1.5), (1.0, 0.5)])
def test_fid_matches_scipy(shift, scale):
    x, y = _features(600, 16, 0), _features(500, 16, 1, shift, scale)
    ours = M.fid(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    ref = _fid_scipy(x, y)
    assert ours == pytest.approx(ref, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("shift", [0.0, 0.2, 1.0])
def test_kid_on_the_full_sample_matches_numpy(shift):
    x, y = _features(300, 8, 2), _features(300, 8, 3, shift)
    # one subset of all items: the permutation does not change a U-statistic, so this is the full-sample MMD^2
    ours = M.kid(torch.from_numpy(x), torch.from_numpy(y), subsets=1, subset_size=300)
    assert ours["kid"] == pytest.approx(_mmd2_unbiased(x, y), rel=1e-3, abs=1e-7)


def test_kid_is_unbiased_and_its_standard_error_is_honest():
    """Over independent draws, the mean KID is the population MMD^2 and the reported SE matches the spread."""
    mu = 0.3
    big_x, big_y = _features(20000, 4, 10), _features(20000, 4, 11, mu)
    population = _mmd2_unbiased(big_x[:4000], big_y[:4000])
    values, ses = [], []
    for s in range(30):
        x, y = _features(400, 4, 100 + 2 * s), _features(400, 4, 101 + 2 * s, mu)
        r = M.kid(torch.from_numpy(x), torch.from_numpy(y), subsets=20, subset_size=100, seed=s)
        values.append(r["kid"])
        ses.append(r["kid_se"])
    spread = float(np.std(values, ddof=1))
    assert abs(np.mean(values) - population) < 3 * spread / np.sqrt(len(values)) + 0.05 * population
    assert 0.5 < np.mean(ses) / spread < 2.0


@pytest.mark.parametrize("n_real,n_fake,subset_size,subsets", [(300, 300, 1000, 10), (1000, 300, 300, 20),
                                                               (400, 400, 100, 20)])
def test_kid_standard_error_matches_the_spread_over_independent_draws(n_real, n_fake, subset_size, subsets):
    """Whatever the subset size (the whole sample, as in `genlab eval` at 300 vs 300; the whole generated sample, as
    in the training evaluator's 500 in subsets of 500; or smaller), the reported SE is the std of KID over
    independent samples (the old SE was ~1e-15 in the first case and 0.56x in the second)."""
    mu, values, ses = 0.5, [], []
    for s in range(40):
        x, y = _features(n_real, 4, 1000 + 2 * s), _features(n_fake, 4, 1001 + 2 * s, mu)
        r = M.kid(torch.from_numpy(x), torch.from_numpy(y), subsets=subsets, subset_size=subset_size, seed=s)
        values.append(r["kid"])
        ses.append(r["kid_se"])
    ratio = float(np.sqrt(np.mean(np.square(ses))) / np.std(values, ddof=1))
    assert 0.7 < ratio < 1.4, ratio


def test_kid_jackknife_variance_matches_brute_force_leave_one_out():
    x, y = _features(30, 3, 6), _features(25, 3, 7, 0.3)
    u_x = np.array([_mmd2_unbiased(np.delete(x, i, 0), y) for i in range(len(x))])
    u_y = np.array([_mmd2_unbiased(x, np.delete(y, j, 0)) for j in range(len(y))])
    brute = 29 / 30 * ((u_x - u_x.mean()) ** 2).sum() + 24 / 25 * ((u_y - u_y.mean()) ** 2).sum()
    ours = M.kid_jackknife_variance(torch.from_numpy(x), torch.from_numpy(y), chunk=7)
    assert ours == pytest.approx(brute, rel=1e-9)


def test_kid_mean_over_subsets_is_seeded():
    x, y = torch.randn(200, 8), torch.randn(200, 8) + 0.2
    a, b = M.kid(x, y, subsets=10, subset_size=50, seed=3), M.kid(x, y, subsets=10, subset_size=50, seed=3)
    assert a == b


def test_inception_score_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1000, 10)) * 3
    ours = M.inception_score(torch.from_numpy(logits), splits=1)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    py = p.mean(0)
    ref = np.exp((p * (np.log(p) - np.log(py))).sum(1).mean())
    assert ours["is"] == pytest.approx(ref, rel=1e-6)
    # one-hot confident predictions spread evenly over 10 classes give the maximum, 10
    assert M.inception_score(torch.eye(10).repeat(100, 1) * 50, splits=1)["is"] == pytest.approx(10, rel=1e-3)


def _brute_prdc(x: np.ndarray, y: np.ndarray, k: int) -> tuple[float, float, float, float]:
    dxx = np.linalg.norm(x[:, None] - x[None], axis=-1)
    dyy = np.linalg.norm(y[:, None] - y[None], axis=-1)
    dyx = np.linalg.norm(y[:, None] - x[None], axis=-1)
    rx = np.sort(dxx, axis=1)[:, k]  # column 0 is the point itself
    ry = np.sort(dyy, axis=1)[:, k]
    precision = np.mean([(dyx[j] <= rx).any() for j in range(len(y))])
    recall = np.mean([(dyx[:, i] <= ry).any() for i in range(len(x))])
    density = sum((dyx[j] <= rx).sum() for j in range(len(y))) / (k * len(y))
    coverage = np.mean([(dyx[:, i] <= rx[i]).any() for i in range(len(x))])
    return precision, recall, density, coverage


@pytest.mark.parametrize("shift", [0.0, 0.5, 2.0])
def test_precision_recall_density_coverage_match_brute_force(shift):
    x, y = _features(300, 5, 4), _features(250, 5, 5, shift, 0.7)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    pr, dc = M.precision_recall(X, Y, k=3), M.density_coverage(X, Y, k=5)
    p, r, _, _ = _brute_prdc(x, y, 3)
    _, _, d, c = _brute_prdc(x, y, 5)
    assert (pr["precision"], pr["recall"]) == pytest.approx((p, r), abs=1e-9)
    assert (dc["density"], dc["coverage"]) == pytest.approx((d, c), abs=1e-9)


def test_coverage_of_identical_distributions_does_not_depend_on_the_sample_size_ratio():
    """Coverage is defined over the real set's k-NN balls (Naeem et al. 2020), so its value for identical
    distributions grows with n_fake / n_real (0.97 at 2,000 vs 2,000, 0.998 at 2,000 vs 5,000): compared on equal
    sizes, 2,000 real vs 5,000 generated measures what 2,000 vs 2,000 does."""
    real, fake = torch.from_numpy(_features(2000, 8, 40)), torch.from_numpy(_features(5000, 8, 41))
    equal = M.density_coverage(real, torch.from_numpy(_features(2000, 8, 42)))["coverage"]
    r = M.precision_recall_density_coverage(real, fake)
    assert r["prc_n"] == 2000 and abs(r["coverage"] - equal) < 0.012, (r["coverage"], equal)
    assert M.precision_recall_density_coverage(fake, real)["prc_n"] == 2000


def test_knn_radii_in_chunks_equal_one_shot():
    x = torch.randn(150, 6)
    torch.testing.assert_close(M.knn_radii(x, 3, chunk=64), M.knn_radii(x, 3, chunk=1000))


def test_mismatched_feature_dims_are_a_user_error():
    with pytest.raises(GenlabError, match="same D"):
        M.fid(torch.randn(10, 4), torch.randn(10, 5))
