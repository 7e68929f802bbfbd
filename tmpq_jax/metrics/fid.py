"""Standard FID (Heusel et al. 2017): Frechet distance between Gaussian fits of FID Inception-v3 pool features.

Images are (n, H, W, 1 or 3) floats in [0, 1]. Features are extracted in fixed-size batches (one compiled program;
the last batch is padded) and reduced to streaming float64 statistics, so memory stays bounded whatever n is.
Statistics files are `.npz` with `mu` and `sigma`, the keys pytorch-fid uses.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tmpq_jax import checkpoint, data
from tmpq_jax.metrics import StreamingStats, frechet_distance
from tmpq_jax.metrics.inception import FEATURE_DIM, InceptionV3FID, param_shapes, preprocess
from tmpq_jax.metrics.inception_weights import (FETCH_HINT, PARAMS_FILE, SOURCE_FILE, WeightsError, cache_dir,
                                                 sha256)

DEFAULT_BATCH = 50
REFERENCE_SETS = ("mnist-heldout", "mnist-train", "mnist-fitness", "mnist-all")


class InputError(ValueError):
    """An image or statistics input has the wrong shape, dtype, range or file format."""


def check_images(images, where: str = "images") -> np.ndarray:
    """(n, H, W, C) float array in [0, 1] with C in {1, 3}, else InputError naming the problem."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] < 1:
        raise InputError(f"{where} must be (n, H, W, C) with n >= 1 and C in {{1, 3}}, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        hint = "; divide uint8 images by 255" if x.dtype == np.uint8 else ""
        raise InputError(f"{where} must be floating point in [0, 1], got dtype {x.dtype}{hint}")
    if not np.isfinite(x).all():
        raise InputError(f"{where} contains NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"{where} must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}]"
                         + ("; images in [-1, 1] map to [0, 1] by (x + 1) / 2" if lo >= -1.0 else ""))
    return x.astype(np.float32, copy=False)


@functools.partial(jax.jit, static_argnames=("quantize", "precision"))
def _features(params, images, quantize: bool, precision: str):
    return InceptionV3FID(precision).apply({"params": params}, preprocess(images, quantize))


@dataclasses.dataclass
class InceptionFeatures:
    """The FID Inception as a batched feature extractor: images in [0, 1] -> (n, 2048) float32.

    `quantize` rounds to 8-bit levels first, as when samples are saved to PNG (the reference pipelines read uint8).
    `precision` is the conv precision; 'highest' keeps float32 on GPUs and TPUs, where the default may be TF32/bf16.
    """

    params: dict
    batch_size: int = DEFAULT_BATCH
    quantize: bool = True
    precision: str = "highest"
    weights_sha256: str = ""

    @classmethod
    def load(cls, cache: str | os.PathLike | None = None, **kwargs) -> "InceptionFeatures":
        root = cache_dir(cache)
        path = root / PARAMS_FILE
        if not path.is_file():
            raise WeightsError(f"Inception weights not found at {path}; {FETCH_HINT}")
        try:
            params = checkpoint.load_tree(path, param_shapes())
        except checkpoint.CheckpointError as e:
            raise WeightsError(f"{e}; convert again with `python experiments/fid.py fetch-weights --force`") from e
        src = root / SOURCE_FILE
        return cls(jax.tree.map(jnp.asarray, params), weights_sha256=sha256(src) if src.is_file() else "", **kwargs)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is invalid; valid: >= 1")

    def batches(self, images, progress: bool = True, desc: str = "inception features"):
        """Yield the features of consecutive batches of `images` (already checked)."""
        n, b = len(images), self.batch_size
        with tqdm(total=n, desc=desc, unit="img", disable=not progress, mininterval=2.0) as bar:
            for i in range(0, n, b):
                chunk = np.asarray(images[i:i + b], np.float32)
                if len(chunk) < b:  # pad to the compiled batch shape
                    chunk = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]), np.float32)])
                out = np.asarray(_features(self.params, chunk, self.quantize, self.precision))
                m = min(b, n - i)
                bar.update(m)
                yield out[:m]

    def features(self, images, progress: bool = True) -> np.ndarray:
        """(n, 2048) float32 features of (n, H, W, C) images in [0, 1]."""
        return np.concatenate(list(self.batches(check_images(images), progress)))

    def stats(self, images, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Streamed float64 (mu, sigma) of the features of (n, H, W, C) images in [0, 1]."""
        x = check_images(images)
        if len(x) < 2:
            raise InputError(f"FID statistics need at least 2 images, got {len(x)}")
        acc = StreamingStats()
        for f in self.batches(x, progress):
            acc.update(f)
        return acc.result()


# ---------------------------------------------------------------- files


def _load_npz(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"file {str(p)!r} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise InputError(f"{str(p)!r} is not a readable .npz file: {e}") from e


def load_images(path: str | os.PathLike) -> np.ndarray:
    """Images from an .npz: the `images` array, or its only array."""
    z = _load_npz(path)
    if "images" in z:
        arr = z["images"]
    elif len(z) == 1:
        arr = next(iter(z.values()))
    else:
        raise InputError(f"{str(path)!r} holds {sorted(z)}; expected an `images` array (n, H, W, C) in [0, 1]")
    return check_images(arr, f"images in {str(path)!r}")


def save_stats(path: str | os.PathLike, mu, sigma, **meta) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             **{k: np.asarray(v) for k, v in meta.items()})


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    z = _load_npz(path)
    if "mu" not in z or "sigma" not in z:
        raise InputError(f"{str(path)!r} holds {sorted(z)}; FID statistics need `mu` and `sigma`")
    mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise InputError(f"{str(path)!r}: mu {mu.shape} and sigma {sigma.shape} are not (d,) and (d, d)")
    if mu.size != FEATURE_DIM:
        raise InputError(f"{str(path)!r}: statistics are {mu.size}-d, the FID Inception's are {FEATURE_DIM}-d")
    return mu, sigma


def stats_of(path: str | os.PathLike, get_extractor: Callable[[], "InceptionFeatures"], progress: bool = True):
    """Statistics of an .npz that holds either statistics (`mu`, `sigma`) or images (then features are extracted)."""
    z = _load_npz(path)
    if "mu" in z or "sigma" in z:
        return load_stats(path)
    return get_extractor().stats(load_images(path), progress)


def reference_stats(reference: str, extractor: InceptionFeatures, cache: str | os.PathLike | None = None,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Reference statistics: a named real set (cached next to the weights) or an .npz of images or statistics."""
    if reference not in REFERENCE_SETS:
        if not reference.endswith(".npz"):
            raise InputError(f"FID reference {reference!r} is neither a known set {REFERENCE_SETS} nor an .npz of "
                             "images or statistics (make one with `python experiments/fid.py stats`)")
        return stats_of(reference, lambda: extractor, progress)
    key = f"{reference}_{extractor.weights_sha256[:12]}_q{int(extractor.quantize)}_{extractor.precision}.npz"
    path = cache_dir(cache) / "reference" / key
    if path.is_file():
        return load_stats(path)
    images = data.to_unit_range(data.mnist(reference.split("-", 1)[1]).images)
    print(f"FID reference statistics: {reference} ({len(images)} images) -> {path}", flush=True)
    mu, sigma = extractor.stats(images, progress)
    save_stats(path, mu, sigma, n=len(images))
    return mu, sigma


def reference_features(reference: str, extractor: InceptionFeatures, cache: str | os.PathLike | None = None,
                       progress: bool = True) -> np.ndarray:
    """(n, 2048) features of a named real set (cached next to the weights) or of an .npz of images (for KID)."""
    if reference not in REFERENCE_SETS:
        z = _load_npz(reference) if reference.endswith(".npz") else {}
        if "images" not in z and len(z) != 1:
            raise InputError(f"KID reference {reference!r} must be a known set {REFERENCE_SETS} or an .npz of images "
                             "(statistics files hold no features)")
        return extractor.features(load_images(reference), progress)
    key = f"{reference}_{extractor.weights_sha256[:12]}_q{int(extractor.quantize)}_{extractor.precision}_features.npz"
    path = cache_dir(cache) / "reference" / key
    if path.is_file():
        return np.asarray(_load_npz(path)["features"], np.float32)
    images = data.to_unit_range(data.mnist(reference.split("-", 1)[1]).images)
    print(f"Inception features: {reference} ({len(images)} images) -> {path}", flush=True)
    feats = extractor.features(images, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=feats)
    return feats


def fid_from_stats(a, b) -> float:
    return frechet_distance(a[0], a[1], b[0], b[1])
