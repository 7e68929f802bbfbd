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
import scipy.linalg

from tmpq_jax import checkpoint
from tmpq_jax.models.classifier import MnistClassifier, classifier_init

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CLASSIFIER = REPO_ROOT / "checkpoints" / "mnist-classifier" / "params.msgpack"


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 with an eps-regularised sqrtm fallback."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


@jax.jit
def _classify(params, images):
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

