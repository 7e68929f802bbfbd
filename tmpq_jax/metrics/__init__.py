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

