"""Fitness of candidates: sample on noise drawn for one purpose, then score with a registered image metric.

Every number comes from noise derived explicitly for its purpose (`purpose_noise`: fold_in(key(seed), purpose)),
so the samples a candidate is selected on are never the samples it is reported on (DESIGN.md Sec. 5):
- `fitness`: the search's generations; `select`: the top-k re-scoring; `report`: every reported number.

A metric maps generated images (n, H, W, C) in [-1, 1] to a float, lower is better. Two kinds:
- reference metrics (Frechet distance, KID) compare the distribution with real data; the fitness's reference
  (`mnist-fitness`) is never a report's (`mnist-heldout`);
- paired metrics (`teacher_*`) compare each sample with the full-precision teacher's sample from the same noise and
  label. DDIM (eta 0) is deterministic, so the pairing is exact and no reference data are needed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax import data, diffusion, metrics, quant, sampling
from tmpq_jax.diffusion.noise import PURPOSES, fixed_batches, purpose_noise  # noqa: F401 (re-exported)

MNIST_SHAPE = (28, 28, 1)


class Metric(Protocol):
    name: str
    paired: bool  # needs the teacher's images from the same noise

    def __call__(self, images: np.ndarray, teacher: np.ndarray | None = None) -> float: ...


# --- feature spaces ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _classifier() -> metrics.ClassifierFeatures:
    return metrics.ClassifierFeatures.load()


def classifier_features(images: np.ndarray) -> np.ndarray:
    """128-d penultimate features of the project's MNIST classifier; images in [-1, 1]."""
    return _classifier().batched(np.asarray(images, np.float32))[1]


@functools.lru_cache(maxsize=4)
def _inception(cache: str, batch: int):
    from tmpq_jax.metrics.fid import InceptionFeatures
    from tmpq_jax.metrics.inception_weights import WeightsError

    try:
        return InceptionFeatures.load(cache or None, batch_size=batch)
    except WeightsError as e:
        raise WeightsError(f"{e}. To search without Inception metrics, pass --config.report_metrics='()' and a "
                           "--config.metric that does not use Inception") from e


def inception_extractor(config):
    """The FID Inception feature extractor of a config (fid_cache, fid_batch), loaded once."""
    return _inception(_get(config, "fid_cache", ""), int(_get(config, "fid_batch", 50)))


def _get(config, key, default):
    return config.get(key, default) if config is not None else default


def reference_images(reference: str) -> np.ndarray:
    """Real images in [-1, 1]: a named MNIST set ('mnist-heldout', 'mnist-fitness', ...) or an .npz of images."""
    from tmpq_jax.metrics.fid import REFERENCE_SETS, load_images

    if reference in REFERENCE_SETS:
        return data.mnist(reference.split("-", 1)[1]).images
    if reference.endswith(".npz"):
        return load_images(reference) * 2.0 - 1.0
    raise ValueError(f"reference {reference!r} is neither a known set {REFERENCE_SETS} nor an .npz of images")


# --- metrics -----------------------------------------------------------------------------------------------------


def _finite(images) -> np.ndarray | None:
    x = np.asarray(images, np.float32)
    return x if np.isfinite(x).all() else None


@dataclasses.dataclass
class ReferenceDistance:
    """A distance from the samples' features to a real reference set, e.g. the Frechet distance (Heusel et al.
    2017, eq. 6) via `metrics.FrechetToReference.distance`, or KID (Binkowski et al. 2018) against reference
    features."""

    name: str
    features: Callable[[np.ndarray], np.ndarray]
    distance: Callable[[np.ndarray], float]  # sample features -> distance to the reference
    paired: bool = False

    def __call__(self, images, teacher=None) -> float:
        x = _finite(images)
        return float("nan") if x is None else float(self.distance(self.features(x)))


def _kid_to(reference_features: np.ndarray) -> Callable[[np.ndarray], float]:
    return lambda feats: metrics.kid(feats, reference_features)


@dataclasses.dataclass
class TeacherDistance:
    """Mean paired squared distance to the FP teacher's samples from the same noise (pixels or features).

    Pixels: mean squared error per pixel. Features: squared L2 distance per sample, divided by the dimension.
    """

    name: str
    features: Callable[[np.ndarray], np.ndarray] | None = None  # None: pixels
    paired: bool = True
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)  # teacher digest -> features

    def _teacher_features(self, t: np.ndarray) -> np.ndarray:
        key = hashlib.sha256(np.ascontiguousarray(t).tobytes()).hexdigest()
        if key not in self._cache:
            self._cache[key] = self.features(t)
        return self._cache[key]

    def __call__(self, images, teacher=None) -> float:
        if teacher is None:
            raise ValueError(f"metric {self.name!r} compares with the teacher's samples, but none were given")
        x = _finite(images)
        if x is None:
            return float("nan")
        t = np.asarray(teacher, np.float32)
        if t.shape != x.shape:
            raise ValueError(f"{self.name}: teacher images {t.shape} do not pair with samples {x.shape}")
        if self.features is not None:
            x, t = self.features(x), self._teacher_features(t)
        return float(np.mean((x.astype(np.float64) - t) ** 2))


def _frechet(name, features_of, reference_features_of):
    def factory(config, reference):
        feats = reference_features_of(config, reference)
        return ReferenceDistance(name, features_of(config),
                                 metrics.FrechetToReference(*metrics.feature_stats(feats)).distance)
    return factory


def _inception_fid(config, reference):
    from tmpq_jax.metrics.fid import reference_stats

    ext = inception_extractor(config)
    stats = reference_stats(reference, ext, _get(config, "fid_cache", "") or None)
    return ReferenceDistance("inception_fid", _inception_images(config), metrics.FrechetToReference(*stats).distance)


def _inception_images(config):
    ext = inception_extractor(config)
    return lambda images: ext.features(data.to_unit_range(images), progress=False)


def _inception_reference(config, reference):
    from tmpq_jax.metrics.fid import reference_features

    return reference_features(reference, inception_extractor(config), _get(config, "fid_cache", "") or None)


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    factory: Callable[[Any, str], Metric]  # (config, reference) -> metric
    needs_reference: bool
    mnist_only: bool  # uses the project's MNIST classifier
    doc: str


METRICS: dict[str, MetricInfo] = {
    "classifier_fd": MetricInfo(_frechet("classifier_fd", lambda c: classifier_features,
                                         lambda c, r: classifier_features(reference_images(r))), True, True,
                                "Frechet distance in the MNIST classifier's 128-d features"),
    "inception_fid": MetricInfo(_inception_fid, True, False, "standard FID (FID Inception-v3, 2048-d)"),
    "kid_classifier": MetricInfo(lambda c, r: ReferenceDistance("kid_classifier", classifier_features,
                                                                _kid_to(classifier_features(reference_images(r)))),
                                 True, True,
                                 "KID in the MNIST classifier's features"),
    "kid_inception": MetricInfo(lambda c, r: ReferenceDistance("kid_inception", _inception_images(c),
                                                               _kid_to(_inception_reference(c, r))), True, False,
                                "KID in FID Inception features"),
    "teacher_mse": MetricInfo(lambda c, r: TeacherDistance("teacher_mse"), False, False,
                              "paired pixel MSE to the FP teacher"),
    "teacher_classifier": MetricInfo(lambda c, r: TeacherDistance("teacher_classifier", classifier_features), False,
                                     True, "paired distance to the FP teacher in classifier features"),
    "teacher_inception": MetricInfo(lambda c, r: TeacherDistance("teacher_inception", _inception_images(c)), False,
                                    False, "paired distance to the FP teacher in Inception features"),
}


def register_metric(name: str, factory: Callable[[Any, str], Metric], needs_reference: bool = True,
                    mnist_only: bool = False, doc: str = "") -> None:
    """Make a metric available by name; `factory(config, reference)` builds it (reference: a set name or path)."""
    METRICS[name] = MetricInfo(factory, needs_reference, mnist_only, doc)


def check_metric_name(name: str, where: str = "metric") -> MetricInfo:
    if name not in METRICS:
        raise ValueError(f"config.{where} has unknown metric {name!r}; valid: {sorted(METRICS)}")
    return METRICS[name]


def check_metric_for_model(name: str, reference: str, sample_shape, where: str = "metric") -> None:
    """A metric or reference that only makes sense for MNIST-shaped models is an error elsewhere."""
    info = check_metric_name(name, where)
    if tuple(sample_shape) == MNIST_SHAPE:
        return
    if info.mnist_only:
        raise ValueError(f"config.{where}={name!r} uses the MNIST classifier, but the model makes "
                         f"{tuple(sample_shape)} samples; use one of "
                         f"{sorted(k for k, v in METRICS.items() if not v.mnist_only)}")
    if info.needs_reference and reference.startswith("mnist-"):
        raise ValueError(f"config.{where}={name!r} would compare {tuple(sample_shape)} samples with the MNIST "
                         f"reference {reference!r}; make statistics of your data with `python experiments/fid.py "
                         "stats` and pass that .npz")


def make_metric(name: str, config=None, reference: str = "mnist-heldout") -> Metric:
    return check_metric_name(name).factory(config, reference)


# --- noise ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NoiseSet:
    """Which samples a number is computed on: seed, purpose and count (stated with every reported number)."""

    seed: int
    purpose: str
    n: int

    def describe(self) -> dict:
        return {"n": self.n, "noise_seed": self.seed, "noise_purpose": self.purpose}


# --- evaluation ----------------------------------------------------------------------------------------------------


def gather(x):
    """A population output sharded over several hosts, gathered on every host (a no-op on one process)."""
    if jax.process_count() > 1 and not getattr(x, "is_fully_addressable", True):
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return x


def candidate_key(ts, wb, ab) -> bytes:
    return b"|".join(np.asarray(a, np.int32).tobytes() for a in (ts, wb, ab))


@dataclasses.dataclass
class Evaluator:
    """Samples populations of (timesteps, w_bits, a_bits) on a NoiseSet and scores them; caches the scores.

    The cache is keyed by (candidate, noise set, metric): with fixed noise a candidate's score is deterministic, so
    a candidate seen before is never sampled again.
    """

    apply_fn: Callable
    sites: quant.SiteTable
    params: Any
    tables: quant.QuantTables
    sample_shape: tuple[int, ...]
    num_classes: int
    strategy: str = "auto"
    chunk_size: int = 1
    sample_batch: int = 256
    schedule: diffusion.NoiseSchedule = diffusion.NoiseSchedule()  # the model's noise schedule and DDIM settings
    decode_fn: Callable | None = None  # latent models: (params, latents) -> images (full precision)
    teachers: dict = dataclasses.field(default_factory=dict)  # NoiseSet -> FP teacher images
    cache: dict = dataclasses.field(default_factory=dict)  # (candidate key, NoiseSet, metric name) -> score
    sampled: int = 0  # candidate sampling runs so far (not counting cache hits)

    def __post_init__(self):
        self.abar = jnp.asarray(self.schedule.alphas_cumprod(), jnp.float32)
        kw = self.schedule.sampler_kwargs()
        self._sampler = sampling.make_population_sampler(self.apply_fn, self.sites, self.strategy, self.chunk_size,
                                                         sampler_kwargs=kw)
        self._fp = jax.jit(lambda params, ts, noise, labels: diffusion.ddim_sample(
            lambda x, t, y: self.apply_fn(params, x, t, y), self.abar, ts, noise, labels, **kw))
        self._decode = jax.jit(self.decode_fn) if self.decode_fn is not None else None
        self._step_errors = sampling.make_population_step_errors(self.apply_fn, self.sites, self.strategy,
                                                                 self.chunk_size, sampler_kwargs=kw)
        self._fp_run: tuple = (None, [])  # (schedule, NoiseSet) of the last step_errors call, its FP run per batch
        self._fp_targets = jax.jit(lambda params, ts, noise, labels: sampling.fp_step_targets(
            self.apply_fn, self.abar, params, ts, noise, labels, kw))

    def _images(self, samples) -> np.ndarray:
        """Sampler outputs -> images: VAE-decoded for latent models (one batch at a time)."""
        if self._decode is None:
            return np.asarray(samples)
        return np.asarray(self._decode(self.params, samples))

    def _batches(self, noise_set: NoiseSet, batch: int | None = None):
        """(noise, labels, real rows) in batches of one size (`fixed_batches`: one compile for every n)."""
        noise, labels = purpose_noise(noise_set.seed, noise_set.purpose, noise_set.n, self.sample_shape,
                                      self.num_classes)
        for idx, real in fixed_batches(noise_set.n, batch or self.sample_batch):
            yield noise[idx], labels[idx], real

    def sample(self, timesteps, w_bits, a_bits, noise_set: NoiseSet) -> np.ndarray:
        """Images (P, n, H, W, C) in [-1, 1] of a population (decoded, for latent models)."""
        pop = (jnp.asarray(w_bits, jnp.int32), jnp.asarray(a_bits, jnp.int32), jnp.asarray(timesteps, jnp.int32))
        outs = []
        for noise, labels, real in self._batches(noise_set):
            out = gather(self._sampler(pop, (self.abar, self.params, self.tables, noise, labels)))[:, :real]
            outs.append(np.stack([self._images(o) for o in out]) if self._decode is not None else np.asarray(out))
        self.sampled += len(pop[0])
        return np.concatenate(outs, axis=1)

    def step_errors(self, timesteps, w_bits, a_bits, noise_set: NoiseSet) -> np.ndarray:
        """(P,) one-step errors of a population on one schedule `timesteps` (N,) (`sampling.
        make_population_step_errors`): from the FP run's states on `noise_set`, averaged over its samples. One
        sampler run's UNet passes per candidate (counted in `sampled`)."""
        ts = jnp.asarray(diffusion.validate_timesteps(np.asarray(timesteps), self.schedule.num_train_timesteps))
        pop = (jnp.asarray(w_bits, jnp.int32), jnp.asarray(a_bits, jnp.int32))
        key = (np.asarray(ts).tobytes(), noise_set)
        if self._fp_run[0] != key:  # the FP run of each batch, once per (schedule, noise set); a set smaller
            # than sample_batch in one batch of its own size (its own compile: no padded rows computed)
            batch = min(noise_set.n, self.sample_batch)
            self._fp_run = (key, [(self._fp_targets(self.params, ts, noise, labels), labels, real)
                                  for noise, labels, real in self._batches(noise_set, batch)])
        outs = []
        for (states, targets), labels, real in self._fp_run[1]:
            outs.append(np.asarray(gather(self._step_errors(pop, (self.abar, self.params, self.tables, ts, states,
                                                                   targets, labels))))[:, :real])
        self.sampled += len(pop[0])
        return np.concatenate(outs, axis=1).mean(axis=1)

    def sample_fp(self, timesteps, noise_set: NoiseSet) -> np.ndarray:
        ts = jnp.asarray(diffusion.validate_timesteps(np.asarray(timesteps), self.schedule.num_train_timesteps))
        return np.concatenate([self._images(self._fp(self.params, ts, noise, labels)[:real])
                               for noise, labels, real in self._batches(noise_set)])

    def teacher(self, noise_set: NoiseSet) -> np.ndarray:
        if noise_set not in self.teachers:
            raise KeyError(f"no teacher images for {noise_set}; compute them first (run's teacher stage)")
        return self.teachers[noise_set]

    def score_images(self, images: np.ndarray, noise_set: NoiseSet, metric_list) -> np.ndarray:
        """(P, M) scores of image sets (P, n, ...) by each metric; NaN stays NaN (the caller makes it infeasible)."""
        teacher = self.teacher(noise_set) if any(m.paired for m in metric_list) else None
        out = np.asarray([[m(im, teacher if m.paired else None) for m in metric_list] for im in images], np.float64)
        return np.where(np.isfinite(out), out, np.nan)

    def evaluate(self, timesteps, w_bits, a_bits, noise_set: NoiseSet, metric_list, feasible=None) -> np.ndarray:
        """(P, M) scores of decoded candidates; infeasible ones score +inf without sampling; cached."""
        ts, wb, ab = (np.asarray(a) for a in (timesteps, w_bits, a_bits))
        keys = [candidate_key(ts[i], wb[i], ab[i]) for i in range(len(ts))]
        ok = np.ones(len(keys), bool) if feasible is None else np.asarray(feasible, bool)
        names = [m.name for m in metric_list]
        todo, seen = [], set()
        for i, k in enumerate(keys):
            if ok[i] and k not in seen and any((k, noise_set, n) not in self.cache for n in names):
                seen.add(k)
                todo.append(i)
        if todo:
            strategy = quant.auto_strategy() if self.strategy == "auto" else self.strategy
            pad = todo + todo[-1:] * (len(keys) - len(todo)) if strategy != "loop" else todo  # keep compiled sizes
            images = self.sample(ts[pad], wb[pad], ab[pad], noise_set)[: len(todo)]
            for i, row in zip(todo, self.score_images(images, noise_set, metric_list)):
                for name, value in zip(names, row):
                    self.cache.setdefault((keys[i], noise_set, name), value)
        return np.array([[self.cache[(k, noise_set, n)] if ok[i] else np.inf for n in names]
                         for i, k in enumerate(keys)], np.float64).reshape(len(keys), len(names))


def finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def nan_to_inf(x):
    x = np.asarray(x, np.float64)
    return np.where(np.isnan(x), math.inf, x)
