"""Image-quality metrics: Frechet distance between Gaussian fits of features (Heusel et al. 2017, eq. 6).

The default feature space on MNIST is the penultimate layer of the project's own classifier
(`checkpoints/mnist-classifier`), so numbers here are *not* comparable with Inception FID from papers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax import checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CLASSIFIER = REPO_ROOT / "checkpoints" / "mnist-classifier" / "params.msgpack"


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)) (Heusel et al. 2017, eq. 6), in float64.

    Tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2. Unlike a general `sqrtm`, this stays real and stable
    for the rank-deficient covariances of small samples (n < feature dim); eigenvalues below zero are round-off.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"feature statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"feature statistic {name} contains NaN or inf")
    root = _psd_sqrt(s1)
    inner = root @ s2 @ root
    tr_covmean = np.sqrt(np.maximum(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of (n, d) features in one shot."""
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


@dataclasses.dataclass
class StreamingStats:
    """Mean and covariance of features fed in batches, in float64, with memory O(d^2) whatever n is.

    Batches are merged with the pairwise update of Chan, Golub and LeVeque (1979): exact up to round-off, and free of
    the cancellation of the naive sum-of-squares formula.
    """

    n: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None  # sum over samples of (x - mean)(x - mean)^T

    def update(self, features) -> "StreamingStats":
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or (self.mean is not None and f.shape[1] != self.mean.size):
            want = "(n, d)" if self.mean is None else f"(n, {self.mean.size})"
            raise ValueError(f"features must be {want}, got shape {f.shape}")
        if not len(f):
            return self
        b_mean = f.mean(0)
        centred = f - b_mean
        b_m2 = centred.T @ centred
        if self.n == 0:
            self.n, self.mean, self.m2 = len(f), b_mean, b_m2
            return self
        n = self.n + len(f)
        delta = b_mean - self.mean
        self.m2 = self.m2 + b_m2 + np.outer(delta, delta) * (self.n * len(f) / n)
        self.mean = self.mean + delta * (len(f) / n)
        self.n = n
        return self

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) with the unbiased (n - 1) covariance, as np.cov."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        return self.mean.copy(), self.m2 / (self.n - 1)


@jax.jit
def _classify(params, images):
    from tmpq_jax.models.classifier import MnistClassifier  # lazy: importing models loads diffusers (3 s)

    logits, feats = MnistClassifier().apply({"params": params}, images)
    return jax.nn.softmax(logits), feats


@dataclasses.dataclass
class ClassifierFeatures:
    """The project classifier as a feature extractor: images in [-1, 1] -> (probabilities, features)."""

    params: dict

    @classmethod
    def load(cls, path: str | Path = DEFAULT_CLASSIFIER) -> "ClassifierFeatures":
        if not Path(path).is_file():
            raise FileNotFoundError(f"classifier checkpoint {str(path)!r} is missing; train it with "
                                    "`python experiments/train_classifier.py --workdir DIR`")
        from tmpq_jax.models.classifier import classifier_init

        return cls(checkpoint.load_tree(path, classifier_init(jax.random.key(0))))

    def __call__(self, images: jax.Array):
        return _classify(self.params, images)

    def batched(self, images: np.ndarray, batch: int = 500):
        outs = [_classify(self.params, jnp.asarray(images[i:i + batch])) for i in range(0, len(images), batch)]
        return np.concatenate([np.asarray(o[0]) for o in outs]), np.concatenate([np.asarray(o[1]) for o in outs])


def classifier_report(clf: ClassifierFeatures, images: np.ndarray, ref_mu, ref_sigma,
                      labels: np.ndarray | None = None) -> dict:
    """Mean confidence, class histogram, label accuracy and feature-space Frechet distance of generated images."""
    probs, feats = clf.batched(images)
    pred = probs.argmax(-1)
    out = {"n": int(len(images)), "mean_confidence": float(probs.max(-1).mean()),
           "class_histogram": np.bincount(pred, minlength=10).tolist(),
           "frechet_distance": frechet_distance(*feature_stats(feats), ref_mu, ref_sigma)}
    if labels is not None:
        out["label_accuracy"] = float((pred == np.asarray(labels)).mean())
    return out



# ---------------------------------------------------------------- KID, Frechet distance to a fixed reference, bootstrap


def _check_features(name: str, features) -> np.ndarray:
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must be (n, d), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or inf")
    return f


def _check_indices(indices, n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be an integer array (B, m), got {idx.dtype} shape {idx.shape}")
    if idx.shape[1] < 2:
        raise ValueError(f"each resample needs at least 2 rows, got {idx.shape[1]}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
    return idx


def _poly_kernel(a: np.ndarray, b: np.ndarray, degree: int, coef0: float) -> np.ndarray:
    return (a @ b.T / a.shape[1] + coef0) ** degree


def _kid_from_kernels(kxx_offdiag_sum, m, kyy_offdiag_sum, n, kxy_sum) -> float:
    return float(kxx_offdiag_sum / (m * (m - 1)) + kyy_offdiag_sum / (n * (n - 1)) - 2.0 * kxy_sum / (m * n))


def _check_kid_inputs(features_x, features_y):
    x, y = _check_features("features_x", features_x), _check_features("features_y", features_y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: features_x {x.shape} vs features_y {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"KID needs at least 2 rows in each set, got n={len(x)} and m={len(y)}")
    return x, y


def kid(features_x, features_y, degree: int = 3, coef0: float = 1.0) -> float:
    """Kernel inception distance: the unbiased MMD^2 estimator (Binkowski et al. 2018, "Demystifying MMD GANs",
    eq. 4; Gretton et al. 2012, eq. 3) with the polynomial kernel k(x, y) = (x.y / d + coef0)^degree, in float64.

    MMD^2_u = sum_{i!=j} k(x_i, x_j) / (n(n-1)) + sum_{i!=j} k(y_i, y_j) / (m(m-1)) - 2 sum_{i,j} k(x_i, y_j) / (nm),
    on the full sets (no subset averaging, unlike the paper's reporting protocol). Can be slightly negative.
    """
    x, y = _check_kid_inputs(features_x, features_y)
    kxx, kyy = _poly_kernel(x, x, degree, coef0), _poly_kernel(y, y, degree, coef0)
    kxy = _poly_kernel(x, y, degree, coef0)
    return _kid_from_kernels(kxx.sum() - np.trace(kxx), len(x), kyy.sum() - np.trace(kyy), len(y), kxy.sum())


def kid_bootstrap(features_x, features_y, indices, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """`kid(features_x[indices[b]], features_y)` for each resample b (Binkowski et al. 2018, eq. 4).

    Duplicated rows of a resample enter the i != j sums like distinct rows (the same estimator applied to the
    resampled set). Kernel matrices are computed once; a resample with row counts c then costs O(n^2):
    sum_{i!=j} k = c^T Kxx c - sum_i c_i Kxx_ii.
    """
    x, y = _check_kid_inputs(features_x, features_y)
    idx = _check_indices(indices, len(x))
    kxx = _poly_kernel(x, x, degree, coef0)
    kyy = _poly_kernel(y, y, degree, coef0)
    kxy_rows = _poly_kernel(x, y, degree, coef0).sum(1)
    kyy_term = kyy.sum() - np.trace(kyy)
    diag = np.diag(kxx)
    m = idx.shape[1]
    out = np.empty(len(idx))
    for b, rows in enumerate(idx):
        c = np.bincount(rows, minlength=len(x)).astype(np.float64)
        out[b] = _kid_from_kernels(c @ kxx @ c - c @ diag, m, kyy_term, len(y), c @ kxy_rows)
    return out


def _sum_sqrt_eigvalsh(a: np.ndarray) -> float:
    """Sum of sqrt of the eigenvalues of symmetric PSD `a`, eigenvalues under the round-off level
    len(a) * eps * max (numpy's matrix_rank tolerance) counted as 0: their square roots, ~sqrt(eps), would otherwise
    bias the trace for rank-deficient matrices (the centred Gram matrix always has one structural zero)."""
    w = np.linalg.eigvalsh((a + a.T) / 2)
    tol = len(a) * np.finfo(np.float64).eps * max(float(w[-1]), 0.0)
    return float(np.sqrt(w[w > tol]).sum())


class FrechetToReference:
    """Frechet distance (Heusel et al. 2017, eq. 6) of feature sets to one fixed reference (mu_r, sigma_r).

    sqrt(sigma_r) = R (symmetric PSD root via eigh) and Tr(sigma_r) are computed once. With Xc the centred (n, d)
    features and S = Xc^T Xc / (n-1), Tr((R S R)^(1/2)) is the sum of square roots of the eigenvalues of
    Y^T Y / (n-1) with Y = Xc R, which has the same nonzero spectrum as the n x n Gram matrix Y Y^T / (n-1); the
    smaller of the two is diagonalised (the Gram route when n - 1 < d).
    """

    def __init__(self, mu_r, sigma_r):
        self.mu = np.asarray(mu_r, np.float64)
        self.sigma = np.atleast_2d(np.asarray(sigma_r, np.float64))
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.size, self.mu.size):
            raise ValueError(f"reference statistics differ in shape: mu {self.mu.shape}, sigma {self.sigma.shape}")
        if not (np.isfinite(self.mu).all() and np.isfinite(self.sigma).all()):
            raise ValueError("reference statistics contain NaN or inf")
        self.root = _psd_sqrt(self.sigma)
        self.trace = float(np.trace(self.sigma))

    @property
    def dim(self) -> int:
        return self.mu.size

    def _features(self, features) -> np.ndarray:
        f = _check_features("features", features)
        if f.shape[1] != self.dim:
            raise ValueError(f"features must be (n, {self.dim}), got shape {f.shape}")
        if len(f) < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {len(f)}")
        return f

    def _finish(self, mean, tr_s, tr_covmean) -> float:
        diff = mean - self.mu
        return float(diff @ diff + tr_s + self.trace - 2.0 * tr_covmean)

    def distance(self, features) -> float:
        """Frechet distance of the features' mean and unbiased covariance to the reference."""
        x = self._features(features)
        n = len(x)
        mean = x.mean(0)
        xc = x - mean
        y = xc @ self.root
        inner = y @ y.T if n - 1 < self.dim else y.T @ y
        return self._finish(mean, float(np.einsum("ij,ij->", xc, xc)) / (n - 1), _sum_sqrt_eigvalsh(inner / (n - 1)))

    def bootstrap(self, features, indices) -> np.ndarray:
        """Distances of features[indices[b]] for each resample b of the (B, m) integer `indices`.

        Y = (X - mean(X)) R and, on the Gram route, its Gram matrix are formed once; a resample then costs an
        O(m^2) double centring of the selected Gram block and one m x m eigvalsh (centring is translation
        invariant, so pre-centring X by its full mean changes nothing except round-off, which it reduces).
        """
        x = self._features(features)
        idx = _check_indices(indices, len(x))
        m = idx.shape[1]
        mean = x.mean(0)
        x0 = x - mean
        y0 = x0 @ self.root
        sq = np.einsum("ij,ij->i", x0, x0)
        gram = y0 @ y0.T if m - 1 < self.dim else None
        out = np.empty(len(idx))
        for b, rows in enumerate(idx):
            mean0 = x0[rows].mean(0)
            tr_s = (sq[rows].sum() - m * (mean0 @ mean0)) / (m - 1)
            if gram is not None:
                g = gram[np.ix_(rows, rows)]
                r = g.mean(1)
                inner = g - r[:, None] - r[None, :] + r.mean()
            else:
                yc = y0[rows] - y0[rows].mean(0)
                inner = yc.T @ yc
            out[b] = self._finish(mean + mean0, tr_s, _sum_sqrt_eigvalsh(inner / (m - 1)))
        return out


def bootstrap_indices(n: int, num: int, seed: int) -> np.ndarray:
    """(num, n) int64 row indices drawn with replacement (Efron 1979 bootstrap) from numpy Generator(seed).

    Passing the same indices to several candidates' features gives a paired bootstrap over the same noise rows.
    """
    if n < 1 or num < 0:
        raise ValueError(f"need n >= 1 and num >= 0, got n={n}, num={num}")
    return np.random.default_rng(seed).integers(0, n, size=(num, n), dtype=np.int64)


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron and Tibshirani 1993, sec. 13.3): the (1-level)/2 and (1+level)/2
    quantiles of the finite values; (nan, nan) when none is finite."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if not v.size:
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(lo), float(hi)
