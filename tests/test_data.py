import pickle

import numpy as np
import pytest
from PIL import Image

from tmpq_jax import data


def test_mnist_split_is_fixed_disjoint_and_scaled():
    train, held = data.mnist("train"), data.mnist("heldout")
    assert (len(train), len(held)) == (4500, 500)
    assert train.images.shape[1:] == (28, 28, 1) and train.images.dtype == np.float32
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    np.testing.assert_array_equal(data.mnist("heldout").images, held.images)
    all_rows = {r.tobytes() for r in data.mnist("all").images}
    assert len({r.tobytes() for r in train.images} & {r.tobytes() for r in held.images}) <= 1  # duplicates in source
    assert len(all_rows) >= 4990
    assert np.bincount(held.labels, minlength=10).min() > 30


def test_image_folder_with_class_subfolders(tmp_path):
    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / cls / "a.png")
    ds = data.load_image_folder(tmp_path)
    assert ds.images.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(ds.labels, [0, 1])
    np.testing.assert_allclose(ds.images[:, 0, 0, 0], [-1.0, 1.0])


def test_image_folder_errors(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_image_folder(tmp_path / "nope")
    with pytest.raises(data.DataError, match="no .png"):
        data.load_image_folder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(data.DataError, match="bad.png"):
        data.load_image_folder(tmp_path)
    (tmp_path / "bad.png").unlink()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(data.DataError, match=r"b.png.*\(9, 9, 1\)"):
        data.load_image_folder(tmp_path)
    assert data.load_image_folder(tmp_path, image_size=8).images.shape == (2, 8, 8, 1)


def test_npz_loader_and_errors(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, images=np.full((3, 4, 4, 3), 255, np.uint8), labels=np.arange(3))
    ds = data.load_npz(good)
    assert ds.images.shape == (3, 4, 4, 3) and ds.images.max() == 1.0
    np.savez(tmp_path / "f.npz", images=np.full((2, 4, 4, 1), 0.5, np.float32))
    assert np.allclose(data.load_npz(tmp_path / "f.npz").images, 0.0)
    cases = {
        "shape.npz": (dict(images=np.zeros((3, 4, 4), np.uint8)), r"\(n, H, W, C\)"),
        "range.npz": (dict(images=np.full((1, 2, 2, 1), 2.0)), r"\[0, 1\]"),
        "dtype.npz": (dict(images=np.zeros((1, 2, 2, 1), np.int64)), "uint8 or float"),
        "key.npz": (dict(pixels=np.zeros((1, 2, 2, 1), np.uint8)), "no 'images'"),
        "labels.npz": (dict(images=np.zeros((2, 2, 2, 1), np.uint8), labels=np.zeros(3)), "labels"),
    }
    for name, (arrays, msg) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(data.DataError, match=msg):
            data.load_npz(tmp_path / name)
    (tmp_path / "corrupt.npz").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="corrupt.npz"):
        data.load_npz(tmp_path / "corrupt.npz")
    with pytest.raises(data.DataError, match="missing.npz"):
        data.load_npz(tmp_path / "missing.npz")


def _write_cifar(root, names, n=2, data_shape=(2, 3072)):
    root.mkdir()
    for name in names:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": np.arange(np.prod(data_shape)).reshape(data_shape).astype(np.uint8) % 255,
                         b"labels": list(range(n))}, f)


def test_cifar10_loader_and_errors(tmp_path):
    _write_cifar(tmp_path / "ok", ["test_batch"])
    ds = data.load_cifar10(tmp_path / "ok", "test")
    assert ds.images.shape == (2, 32, 32, 3)
    with pytest.raises(data.DataError, match="data_batch_1"):
        data.load_cifar10(tmp_path / "ok", "train")
    _write_cifar(tmp_path / "bad", ["test_batch"], data_shape=(2, 100))
    with pytest.raises(data.DataError, match=r"\(n, 3072\)"):
        data.load_cifar10(tmp_path / "bad", "test")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "test_batch").write_bytes(b"xx")
    with pytest.raises(data.DataError, match="cannot read"):
        data.load_cifar10(tmp_path / "corrupt", "test")
