import jax
import numpy as np
import pytest

from tmpq_jax import checkpoint, models


def test_tree_round_trip(tmp_path):
    tree = {"a": np.arange(6.0).reshape(2, 3), "b": {"c": np.int32(7)}}
    checkpoint.save_tree(tmp_path / "t.msgpack", tree)
    back = checkpoint.load_tree(tmp_path / "t.msgpack", tree)
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert int(back["b"]["c"]) == 7


def test_params_round_trip_and_mismatch(tmp_path, tiny):
    path = tmp_path / "p.msgpack"
    checkpoint.save_tree(path, tiny.params)
    back = checkpoint.load_params(path, tiny.spec)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                                            back, tiny.params)))
    with pytest.raises(checkpoint.CheckpointError, match="does not match the model config.*(missing|file has)"):
        checkpoint.load_params(path, models.get_spec("mnist-small"))


def test_corrupt_and_missing_checkpoint(tmp_path):
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\x00\x01 definitely not msgpack")
    with pytest.raises(checkpoint.CheckpointError, match="bad.msgpack.*corrupt"):
        checkpoint.load_tree(bad)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_tree(tmp_path / "none.msgpack")
