"""Checkpoints: msgpack files of array trees, written atomically, with shape checks on load.

`save_tree` / `load_tree` move any pytree of arrays. `load_params` checks a parameter file against the shapes a
model config expects and names every mismatched path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not match the model."""


def is_primary() -> bool:
    """Whether this process writes files: the only process, or process 0 of a multi-host run."""
    return jax.process_index() == 0


def _atomic_write(path: Path, data: bytes) -> None:
    if not is_primary():  # multi-host: only process 0 writes
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_tree(path: str | os.PathLike, tree: Any) -> str:
    """Write a pytree of arrays as msgpack (atomically). Returns the file's sha256."""
    state = serialization.to_state_dict(jax.device_get(tree))
    data = serialization.msgpack_serialize(state)
    _atomic_write(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def load_tree(path: str | os.PathLike, target: Any = None) -> Any:
    """Read a msgpack pytree; with `target`, restore into its structure (shapes checked)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    try:
        state = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or not a msgpack checkpoint: {e}") from e
    if target is None:
        return state
    check_shapes(state, serialization.to_state_dict(target), str(path))
    return serialization.from_state_dict(target, state)


def check_shapes(found: Any, expected: Any, where: str) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped leaves."""
    f = {"/".join(map(str, k)): np.shape(v) for k, v in flatten_dict(found, keep_empty_nodes=False).items()} \
        if isinstance(found, dict) else {}
    e = {"/".join(map(str, k)): tuple(getattr(v, "shape", np.shape(v)))
         for k, v in flatten_dict(expected, keep_empty_nodes=False).items()} if isinstance(expected, dict) else {}
    problems = [f"missing {k} {e[k]}" for k in sorted(set(e) - set(f))]
    problems += [f"unexpected {k} {f[k]}" for k in sorted(set(f) - set(e))]
    problems += [f"{k}: file has {f[k]}, model expects {e[k]}" for k in sorted(set(e) & set(f)) if f[k] != e[k]]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise CheckpointError(f"checkpoint {where!r} does not match the model config: {shown}")


def load_params(path: str | os.PathLike, spec) -> Any:
    """Load UNet parameters saved by `save_tree` and check them against `spec`'s shapes."""
    from tmpq_jax.models import param_shapes

    state = load_tree(path)
    check_shapes(state, param_shapes(spec), str(path))
    return jax.tree.map(lambda x: jax.numpy.asarray(x), state)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    _atomic_write(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
