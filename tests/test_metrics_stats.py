"""KID, Frechet distance to a fixed reference (Gram route), paired bootstrap and percentile intervals."""

import itertools

import numpy as np
import pytest

from tmpq_jax.metrics import (FrechetToReference, bootstrap_indices, feature_stats, frechet_distance, kid,
                              kid_bootstrap, percentile_interval)


def _reference(d, seed=100):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((3 * d + 10, d)) @ (rng.standard_normal((d, d)) / np.sqrt(d)) + 0.3
    return feature_stats(ref)


def _features(n, d, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d) + rng.standard_normal(d)


# (n, d): Gram route when n - 1 < d, d x d route otherwise; includes both sides of the boundary n - 1 == d
SHAPES = [(20, 64), (2, 8), (40, 40), (41, 40), (42, 40), (200, 16)]


def _frechet_exact_rank(x, mu_r, sigma_r):
    """Eq. 6 through sqrt(S) (not sqrt(sigma_r)), keeping only the rank(S) = min(n - 1, d) leading eigenvalues of
    S^(1/2) sigma_r S^(1/2): the others are structurally zero, and the sqrt of their round-off is what biases
    `frechet_distance` by ~sqrt(eps) each when n - 1 < d."""
    mu, s = feature_stats(x)
    w, v = np.linalg.eigh(s)
    root = (v * np.sqrt(np.maximum(w, 0))) @ v.T
    lam = np.sort(np.linalg.eigvalsh(root @ sigma_r @ root))[::-1][:min(len(x) - 1, len(mu))]
    diff = mu - mu_r
    return diff @ diff + np.trace(s) + np.trace(sigma_r) - 2 * np.sqrt(np.maximum(lam, 0)).sum()


@pytest.mark.parametrize("n,d", SHAPES)
def test_distance_matches_frechet_distance(n, d):
    mu_r, sigma_r = _reference(d)
    x = _features(n, d)
    got = FrechetToReference(mu_r, sigma_r).distance(x)
    np.testing.assert_allclose(got, _frechet_exact_rank(x, mu_r, sigma_r), rtol=1e-10)
    # frechet_distance sums sqrt(round-off ~1e-15) over the d - n + 1 structural zeros when n - 1 < d: ~1e-8 relative
    rtol = 1e-8 if n - 1 >= d else 3e-8
    np.testing.assert_allclose(got, frechet_distance(*feature_stats(x), mu_r, sigma_r), rtol=rtol)


@pytest.mark.parametrize("n,d", SHAPES)
def test_bootstrap_identity_equals_distance(n, d):
    mu_r, sigma_r = _reference(d)
    x = _features(n, d, seed=2)
    ref = FrechetToReference(mu_r, sigma_r)
    got = ref.bootstrap(x, np.arange(n)[None])
    assert got.shape == (1,)
    np.testing.assert_allclose(got[0], ref.distance(x), rtol=1e-9)


@pytest.mark.parametrize("n,d", [(30, 64), (120, 16)])
def test_bootstrap_resamples_match_distance_and_differ(n, d):
    mu_r, sigma_r = _reference(d)
    x = _features(n, d, seed=3)
    ref = FrechetToReference(mu_r, sigma_r)
    idx = bootstrap_indices(n, 12, seed=0)
    got = ref.bootstrap(x, idx)
    np.testing.assert_allclose(got, [ref.distance(x[rows]) for rows in idx], rtol=1e-9)
    np.testing.assert_allclose(got, [frechet_distance(*feature_stats(x[rows]), mu_r, sigma_r) for rows in idx],
                               rtol=1e-8 if n - 1 >= d else 3e-8)
    assert len(np.unique(got)) == len(idx)
    assert np.ptp(got) > 1e-3 * np.abs(got).mean()


def test_bootstrap_indices_paired_and_seeded():
    a, b, c = bootstrap_indices(50, 7, seed=3), bootstrap_indices(50, 7, seed=3), bootstrap_indices(50, 7, seed=4)
    assert a.shape == (7, 50) and a.dtype == np.int64
    assert a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert any(len(np.unique(r)) < 50 for r in a)  # with replacement


def _kid_brute(x, y, degree=3, coef0=1.0):
    d = x.shape[1]
    k = lambda a, b: (sum(ai * bi for ai, bi in zip(a, b)) / d + coef0) ** degree  # noqa: E731
    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


@pytest.mark.parametrize("n,m,d,degree,coef0", [(7, 5, 3, 3, 1.0), (4, 9, 6, 2, 0.5), (2, 2, 1, 3, 1.0),
                                                (6, 6, 4, 1, 0.0)])
def test_kid_matches_brute_force(n, m, d, degree, coef0):
    rng = np.random.default_rng(n * 100 + m)
    x, y = rng.standard_normal((n, d)), rng.standard_normal((m, d)) + 0.5
    np.testing.assert_allclose(kid(x, y, degree=degree, coef0=coef0), _kid_brute(x, y, degree, coef0), rtol=1e-10)


def test_kid_same_distribution_near_zero():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((300, 16)), rng.standard_normal((250, 16))
    shifted = kid(x, y + 1.0)
    assert shifted > 0.1
    assert abs(kid(x, y)) < 0.02 * shifted


def test_kid_bootstrap_matches_kid_on_resamples():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((15, 4)), rng.standard_normal((11, 4)) + 0.2
    idx = bootstrap_indices(15, 6, seed=1)
    idx[0] = 3  # every row the same: all pairs duplicated
    got = kid_bootstrap(x, y, idx)
    np.testing.assert_allclose(got, [_kid_brute(x[rows], y) for rows in idx], rtol=1e-10)
    np.testing.assert_allclose(kid_bootstrap(x, y, np.arange(15)[None])[0], kid(x, y), rtol=1e-12)


@pytest.mark.parametrize("fn", [kid, lambda x, y: kid_bootstrap(x, y, np.zeros((1, 2), np.int64))])
@pytest.mark.parametrize("x_shape,y_shape,match", [
    ((5, 3), (5, 4), r"features_x \(5, 3\) vs features_y \(5, 4\)"),
    ((1, 3), (5, 3), r"n=1 and m=5"),
    ((5, 3), (1, 3), r"n=5 and m=1"),
])
def test_kid_errors(fn, x_shape, y_shape, match):
    with pytest.raises(ValueError, match=match):
        fn(np.ones(x_shape), np.ones(y_shape))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_rejected(bad):
    x = np.ones((4, 3))
    x[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        kid(x, np.ones((4, 3)))
    with pytest.raises(ValueError, match="NaN or inf"):
        kid(np.ones((4, 3)), x)
    with pytest.raises(ValueError, match="NaN or inf"):
        FrechetToReference(np.zeros(3), np.eye(3)).distance(x)


def test_frechet_to_reference_errors():
    ref = FrechetToReference(np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"\(n, 3\), got shape \(5, 4\)"):
        ref.distance(np.ones((5, 4)))
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        ref.distance(np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        ref.bootstrap(np.ones((5, 3)), np.array([[0, 5]]))


def test_percentile_interval_ignores_non_finite():
    v = np.arange(101.0)
    lo, hi = percentile_interval(np.concatenate([v, [np.inf, -np.inf, np.nan]]), level=0.9)
    assert (lo, hi) == pytest.approx((5.0, 95.0))
    assert percentile_interval(v) == pytest.approx((2.5, 97.5))
    assert all(np.isnan(percentile_interval([np.inf, np.nan])))
