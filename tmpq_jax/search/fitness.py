"""Fitness of candidates: sample with fixed noise seeds, then score with a pluggable image metric.

A metric maps generated images (n, H, W, C) in [-1, 1] to a float, lower is better. All candidates see the same
noise and labels, so their scores are comparable and runs are deterministic.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax import data, diffusion, metrics, quant


class Metric(Protocol):
    name: str

    def __call__(self, images: np.ndarray) -> float: ...


@dataclasses.dataclass
class ClassifierFrechet:
    """Frechet distance in the project classifier's 128-d feature space against held-out real digits."""

    classifier: metrics.ClassifierFeatures
    ref_mu: np.ndarray
    ref_sigma: np.ndarray
    name: str = "classifier_fd"

    @classmethod
    def mnist_heldout(cls, config=None) -> "ClassifierFrechet":
        del config
        clf = metrics.ClassifierFeatures.load()
        _, feats = clf.batched(data.mnist("heldout").images)
        return cls(clf, *metrics.feature_stats(feats))

    def __call__(self, images: np.ndarray) -> float:
        images = np.asarray(images, np.float32)
        if not np.isfinite(images).all():
            return float("nan")
        _, feats = self.classifier.batched(images)
        return metrics.frechet_distance(*metrics.feature_stats(feats), self.ref_mu, self.ref_sigma)


def _inception_fid(config=None) -> Metric:
    from tmpq_jax.metrics.fid import InceptionFID
    from tmpq_jax.metrics.inception_weights import WeightsError

    try:
        return InceptionFID.from_config(config)
    except WeightsError as e:
        raise WeightsError(f"{e}. To search without Inception FID, pass --config.report_metrics='()' (and a "
                           "--config.metric other than inception_fid)") from e


# name -> factory(config): config fields a metric reads (e.g. fid_reference) come from the search config
METRICS: dict[str, Callable[[Any], Metric]] = {"classifier_fd": ClassifierFrechet.mnist_heldout,
                                               "inception_fid": _inception_fid}


def register_metric(name: str, factory: Callable[[Any], Metric]) -> None:
    """Make a metric available to the search by name; `factory(config)` builds it."""
    METRICS[name] = factory


def check_metric_name(name: str, where: str = "metric") -> None:
    if name not in METRICS:
        raise ValueError(f"config.{where} has unknown metric {name!r}; valid: {sorted(METRICS)}")


def make_metric(name: str, config=None) -> Metric:
    check_metric_name(name)
    return METRICS[name](config)


def fixed_noise(seed: int, n: int, sample_shape: tuple[int, ...], num_classes: int):
    """The noise and labels every candidate is scored on (labels cycle over the classes)."""
    noise = jax.random.normal(jax.random.key(seed), (n, *sample_shape), jnp.float32)
    labels = jnp.arange(n) % num_classes if num_classes else jnp.full((n,), 0)
    return noise, labels.astype(jnp.int32)


@dataclasses.dataclass
class Evaluator:
    """Samples populations of (timesteps, w_bits, a_bits) and scores them."""

    apply_fn: Callable
    sites: quant.SiteTable
    params: Any
    tables: quant.QuantTables
    sample_shape: tuple[int, ...]
    num_classes: int
    metric: Metric
    noise_seed: int = 0
    strategy: str = "auto"
    chunk_size: int = 1
    sample_batch: int = 256

    def __post_init__(self):
        self.abar = jnp.asarray(diffusion.alphas_cumprod(), jnp.float32)
        self._sampler = quant.make_population_sampler(self.apply_fn, self.sites, self.strategy, self.chunk_size)
        self._fp = jax.jit(lambda params, ts, noise, labels: diffusion.ddim_sample(
            lambda x, t, y: self.apply_fn(params, x, t, y), self.abar, ts, noise, labels))

    def _batches(self, n: int):
        noise, labels = fixed_noise(self.noise_seed, n, self.sample_shape, self.num_classes)
        for i in range(0, n, self.sample_batch):
            yield noise[i:i + self.sample_batch], labels[i:i + self.sample_batch]

    def sample(self, timesteps, w_bits, a_bits, n: int) -> np.ndarray:
        """Images (P, n, H, W, C) in [-1, 1] of a population."""
        pop = (jnp.asarray(w_bits, jnp.int32), jnp.asarray(a_bits, jnp.int32), jnp.asarray(timesteps, jnp.int32))
        outs = [np.asarray(self._sampler(pop, (self.abar, self.params, self.tables, noise, labels)))
                for noise, labels in self._batches(n)]
        return np.concatenate(outs, axis=1)

    def sample_fp(self, timesteps, n: int) -> np.ndarray:
        ts = jnp.asarray(diffusion.validate_timesteps(np.asarray(timesteps)))
        return np.concatenate([np.asarray(self._fp(self.params, ts, noise, labels))
                               for noise, labels in self._batches(n)])

    def score(self, images: np.ndarray) -> np.ndarray:
        """Metric per candidate; NaN (a broken candidate) stays NaN for the caller to treat as infeasible."""
        out = np.asarray([self.metric(im) for im in images], np.float64)
        return np.where(np.isfinite(out), out, np.nan)


def nan_to_inf(x):
    x = np.asarray(x, np.float64)
    return np.where(np.isnan(x), math.inf, x)
