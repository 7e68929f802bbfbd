"""Pretrained diffusers PyTorch weights for Flax Linen ports: read them without torch, convert them mechanically.

`read_torch_weights` reads a diffusers component folder (`diffusion_pytorch_model.safetensors`, a sharded
`*.safetensors.index.json`, or a `.bin` when torch is installed) into float32 numpy arrays. `torch_to_flax` maps a
PyTorch state dict onto the parameter tree a Linen model expects, where the Linen module names follow the PyTorch
module tree with numeric segments joined by '_' (`down_blocks.0.resnets.1.conv1.weight` ->
`down_blocks_0/resnets_1/conv1/kernel`). Every name and shape is checked; all problems go into one error.
Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from tmpq_jax.checkpoint import CheckpointError, check_shapes, load_tree

__all__ = ["FLAX_WEIGHTS", "WeightsError", "load_component", "locate_torch_weights", "read_torch_weights", "torch_to_flax", "flax_path", "torch_name",
           "weight_files"]

STEM = "diffusion_pytorch_model"
FLAX_WEIGHTS = "diffusion_flax_model.msgpack"  # converted params (`experiments/convert.py`), read before PyTorch
_SHOWN = 10  # problems listed per kind in an error message


class WeightsError(CheckpointError):
    """Pretrained weights are missing, corrupt or do not match the model."""


# --- reading ------------------------------------------------------------------------------------------------------


def weight_files(stem: str = STEM, variant: str | None = None) -> list[str]:
    """The file names looked for, in order of preference."""
    base = f"{stem}.{variant}" if variant else stem
    return [f"{base}.safetensors", f"{base}.safetensors.index.json", f"{base}.bin", f"{base}.bin.index.json"]


def locate_torch_weights(folder: str | os.PathLike, variant: str | None = None, stem: str = STEM) -> Path:
    """The weights file (or shard index) `read_torch_weights` would read; WeightsError when there is none."""
    folder = Path(folder)
    names = weight_files(stem, variant)
    if not folder.is_dir():
        raise WeightsError(f"weights folder {str(folder)!r} does not exist (looked for {', '.join(names)}); "
                           f"nothing is downloaded: fetch the model first, e.g. `huggingface-cli download <repo>`")
    for name in names:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir())
    raise WeightsError(f"no weights file in {str(folder)!r}: looked for {', '.join(names)}; the folder holds "
                       f"{present[:12]}{' ...' if len(present) > 12 else ''}. Nothing is downloaded: fetch the "
                       f"model first, e.g. `huggingface-cli download <repo> --local-dir <dir>`")


def read_torch_weights(folder: str | os.PathLike, variant: str | None = None,
                       stem: str = STEM) -> dict[str, np.ndarray]:
    """PyTorch weights of one diffusers component folder as {name: array}; floating arrays become float32.

    Looks for `<stem>[.<variant>].safetensors`, its sharded `.safetensors.index.json`, then `.bin` (and its
    index; needs torch). Raises WeightsError naming the folder/file when nothing is found or a file is corrupt.
    """
    # 1. the first file present, in order of preference
    path = locate_torch_weights(folder, variant, stem)
    if path.name.endswith(".safetensors"):
        state = _read_safetensors(path)
    elif path.name.endswith(".safetensors.index.json"):
        state = _read_sharded(path, _read_safetensors)
    elif path.name.endswith(".bin"):
        state = _read_bin(path)
    else:
        state = _read_sharded(path, _read_bin)
    # 2. floating tensors (fp16, bf16, fp64) -> float32
    return {k: _to_float32(v) for k, v in state.items()}


def _to_float32(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.float32:
        return a
    if np.issubdtype(a.dtype, np.floating) or a.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return a.astype(np.float32)
    return a


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except TypeError as e:  # numpy has no bfloat16 / float8: safetensors.numpy cannot build those arrays
        if "not understood" not in str(e):
            raise WeightsError(f"weights file {str(path)!r} could not be read: {e}") from e
        return _read_safetensors_raw(path)
    except Exception as e:
        raise WeightsError(f"weights file {str(path)!r} is corrupt or not a safetensors file: {e}") from e


def _safetensors_dtypes() -> dict[str, Any]:
    import ml_dtypes

    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
            "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors_raw(path: Path) -> dict[str, np.ndarray]:
    """Parse a safetensors file directly (8-byte header length, JSON header, data); for bf16 / fp8 tensors."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
        (n,) = struct.unpack("<Q", bytes(data[:8]))
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
        body = data[8 + n:]
        dtypes = _safetensors_dtypes()
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in dtypes:
                raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            dt = np.dtype(dtypes[info["dtype"]])
            shape = tuple(info["shape"])
            if end > body.size or end - start != dt.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise ValueError(f"tensor {name!r} has bad data offsets {start}..{end}")
            out[name] = np.frombuffer(body[start:end], dtype=dt).reshape(shape)
        return out
    except Exception as e:
        raise WeightsError(f"weights file {str(path)!r} is corrupt or not a safetensors file: {e}") from e


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise WeightsError(f"{str(path)!r} is a PyTorch pickle and torch is not installed; install torch or "
                           f"convert the file to safetensors") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"weights file {str(path)!r} is corrupt or not a PyTorch state dict: {e}") from e
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"weights file {str(path)!r} holds a {type(state).__name__}, not a state dict")
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"weights file {str(path)!r}: entry {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach().cpu()
        out[k] = (v.float() if v.is_floating_point() else v).numpy()
    return out


def _read_sharded(index: Path, read_one: Callable[[Path], dict]) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except Exception as e:
        raise WeightsError(f"weights index {str(index)!r} is corrupt (needs a 'weight_map'): {e}") from e
    out: dict[str, np.ndarray] = {}
    for name in shards:
        shard = index.parent / name
        if not shard.is_file():
            raise WeightsError(f"shard {str(shard)!r} listed in {str(index)!r} does not exist")
        out.update(read_one(shard))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise WeightsError(f"weights index {str(index)!r} lists {len(missing)} tensors its shards lack, "
                           f"e.g. {missing[:5]}")
    return out


# --- conversion ---------------------------------------------------------------------------------------------------

_NUM = re.compile(r"^\d+$")
_WEIGHT_LEAVES = ("kernel", "scale", "embedding", "weight")  # Flax names a PyTorch `.weight` can map to


def flax_path(torch_module: str) -> tuple[str, ...]:
    """`down_blocks.0.resnets.1.conv1` -> ('down_blocks_0', 'resnets_1', 'conv1'): numbers join the name before."""
    out: list[str] = []
    for seg in torch_module.split(".") if torch_module else []:
        if _NUM.match(seg) and out:
            out[-1] = f"{out[-1]}_{seg}"
        else:
            out.append(seg)
    return tuple(out)


_LIST_NAMES = ("to_out", "net")  # PyTorch ModuleLists whose names do not end in 's'


def torch_name(path: tuple[str, ...] | str, prefixes: frozenset[str] | set[str] = frozenset()) -> str:
    """The PyTorch name of a Flax parameter path (for messages). `name_N` becomes `name.N` when that module prefix is
    in `prefixes` (those of the state dict), else when `name` looks like a ModuleList (plural, `to_out`, `net`)."""
    parts = path.split("/") if isinstance(path, str) else list(path)
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(parts[-1], parts[-1])
    cur = ""
    for seg in parts[:-1]:
        m = re.match(r"^(.*)_(\d+)$", seg)
        kept, split = f"{cur}.{seg}".lstrip("."), (f"{cur}.{m.group(1)}.{m.group(2)}".lstrip(".") if m else None)
        if split is None or kept in prefixes:
            cur = kept
        elif split in prefixes or m.group(1).endswith("s") or m.group(1) in _LIST_NAMES:
            cur = split
        else:
            cur = kept
    return f"{cur}.{leaf}".lstrip(".")


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch layout of a Flax leaf's shape: (*k, I, O) kernels -> (O, I, *k)."""
    if leaf == "kernel" and len(shape) >= 2:
        return (shape[-1], shape[-2], *shape[:-2])
    return tuple(shape)


def _convert(arr: np.ndarray, leaf: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """PyTorch layout -> Flax layout for one leaf; None when no rule gives `shape`."""
    if leaf == "kernel":
        if arr.ndim == len(shape) and arr.ndim >= 3:  # conv: (O, I, *k) -> (*k, I, O)
            out = np.transpose(arr, tuple(range(2, arr.ndim)) + (1, 0))
        elif arr.ndim == 2 and len(shape) == 2:  # linear: (out, in) -> (in, out)
            out = arr.T
        elif arr.ndim >= 3 and len(shape) == 2 and all(s == 1 for s in arr.shape[2:]):  # 1x1 conv -> Dense
            out = arr.reshape(arr.shape[:2]).T
        elif arr.ndim == 2 and len(shape) >= 3 and all(s == 1 for s in shape[:-2]):  # linear -> 1x1 conv
            out = arr.T.reshape(shape)
        else:
            return None
    else:  # bias, scale (norm weight), embedding, other named params: same layout
        out = arr
    return out if tuple(out.shape) == tuple(shape) else None


def flax_target(torch_key: str, expected: Mapping[tuple[str, ...], Any]) -> tuple[str, ...] | None:
    """The Flax leaf path (a key of `expected`) that a PyTorch tensor name fills, or None (`torch_to_flax`'s rule:
    `.weight` becomes kernel, scale, embedding or weight, whichever `expected` holds)."""
    mod, _, leaf = torch_key.rpartition(".")
    path = flax_path(mod)
    if leaf == "weight":
        return next((path + (n,) for n in _WEIGHT_LEAVES if path + (n,) in expected), None)
    return path + (leaf,) if path + (leaf,) in expected else None


def flax_to_torch(params: Any, torch_shapes: Mapping[str, tuple[int, ...]],
                  rename: Callable[[str], str] | None = None, where: str = "") -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flax`: float32 arrays named and laid out as the PyTorch state dict whose names and
    shapes are `torch_shapes` (conv HWIO -> OIHW, linear transposed, Dense <-> 1x1 conv reshaped). Every PyTorch
    name must map to a distinct Flax leaf and every Flax leaf must be used; else one WeightsError."""
    flat = flatten_dict(dict(params))
    out, used, problems = {}, set(), []
    for key, shape in torch_shapes.items():
        target = flax_target(rename(key) if rename is not None else key, flat)
        if target is None or target in used:
            problems.append(f"{key} {tuple(shape)}: {'no' if target is None else 'a second'} Flax leaf")
            continue
        used.add(target)
        arr = np.asarray(flat[target], np.float32)
        if target[-1] == "kernel" and arr.ndim >= 2:  # (*k, I, O) -> (O, I, *k); Dense (I, O) -> (O, I)
            arr = np.transpose(arr, (arr.ndim - 1, arr.ndim - 2, *range(arr.ndim - 2)))
        if arr.size != int(np.prod(shape)):
            problems.append(f"{key}: PyTorch {tuple(shape)}, Flax {'/'.join(target)} {tuple(flat[target].shape)}")
            continue
        out[key] = np.ascontiguousarray(arr.reshape(shape))
    unused = sorted("/".join(k) for k in set(flat) - used)
    if unused:
        problems.append(f"{len(unused)} Flax leaves with no PyTorch name, e.g. {unused[:3]}")
    if problems:
        raise WeightsError(f"params do not map onto the PyTorch names of {where or 'the state dict'!r}: "
                           + "; ".join(problems[:_SHOWN]))
    return out


def torch_to_flax(state: Mapping[str, np.ndarray], expected: Any, rename: Callable[[str], str] | None = None,
                  where: str = "") -> dict:
    """Convert a diffusers PyTorch state dict into the Linen params tree `expected` (ShapeDtypeStructs).

    Keys map mechanically (see `flax_path`); `.weight` becomes `kernel` (conv OIHW -> HWIO, linear transposed,
    a 1x1 conv onto a Dense kernel and back), `scale` (norms), `embedding` or `weight`, whichever `expected`
    holds. Missing, unexpected and mis-shaped tensors are all listed in one WeightsError mentioning `where`.
    """
    exp = {k: tuple(v.shape) for k, v in flatten_dict(dict(expected)).items()}
    exp_dtype = {k: getattr(v, "dtype", np.float32) for k, v in flatten_dict(dict(expected)).items()}
    out: dict[tuple[str, ...], np.ndarray] = {}
    source: dict[tuple[str, ...], str] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    duplicated: list[str] = []
    seen: set[tuple[str, ...]] = set()  # targets a tensor was found for (even of the wrong shape)
    renamed = {key: rename(key) if rename is not None else key for key in state}
    for key in sorted(state):
        new = renamed[key]
        shown = key if new == key else f"{key} (as {new})"
        # 1. the Flax leaf this tensor fills
        target = flax_target(new, exp)
        if target is None:
            unexpected.append(f"{shown} {tuple(np.shape(state[key]))}")
            continue
        if target in seen:
            duplicated.append(f"{shown} and {source[target]} both map to {'/'.join(target)}")
            continue
        seen.add(target)
        source[target] = key
        # 2. its layout and shape
        arr = np.asarray(state[key])
        conv = _convert(arr, target[-1], exp[target])
        if conv is None:
            mismatched.append(f"{shown}: file has {tuple(arr.shape)}, model expects "
                              f"{_torch_shape(target[-1], exp[target])} (Flax {'/'.join(target)} {exp[target]})")
            continue
        floating = jnp.issubdtype(exp_dtype[target], jnp.floating)
        out[target] = np.ascontiguousarray(conv, dtype=np.float32 if floating else exp_dtype[target])
    mods = [k.split(".")[:-1] for k in renamed.values()]
    prefixes = {".".join(m[:i]) for m in mods for i in range(1, len(m) + 1)}
    missing = [f"{torch_name(k, prefixes)} {_torch_shape(k[-1], exp[k])} (Flax {'/'.join(k)} {exp[k]})"
               for k in sorted(set(exp) - seen)]
    # 3. one error with every problem
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched),
                         ("duplicates", duplicated)):
        if items:
            more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
            parts.append(f"{len(items)} {label}: " + "; ".join(items[:_SHOWN]) + more)
    if parts:
        raise WeightsError(f"weights {where or '<state dict>'!r} do not match the model "
                           f"({len(state)} tensors in file, {len(exp)} expected). " + ". ".join(parts))
    return unflatten_dict(out)


def load_component(folder: str | os.PathLike, expected: Any, rename: Callable[[str], str] | None = None,
                   skip: tuple[str, ...] = (), hint: str = "nothing is downloaded: fetch the model first") -> dict:
    """One diffusers component's params matching `expected` (shapes from `jax.eval_shape`): `FLAX_WEIGHTS` if
    present, else its PyTorch weights (an fp16 variant when that is the only file) converted by `torch_to_flax`;
    tensors whose names start with `skip` are not read. Every mismatch is one WeightsError."""
    folder = Path(folder)
    # 1. converted Flax params
    flax_file = folder / FLAX_WEIGHTS
    if flax_file.is_file():
        try:
            state = load_tree(flax_file)
            check_shapes(state, expected, str(flax_file))
        except CheckpointError as e:
            raise WeightsError(str(e)) from e
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), state)
    # 2. PyTorch weights
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is missing; {hint}")
    variant = None
    if not any((folder / n).is_file() for n in weight_files()) and \
            any((folder / n).is_file() for n in weight_files(variant="fp16")):
        variant = "fp16"
    where = str(locate_torch_weights(folder, variant))
    state = {k: v for k, v in read_torch_weights(folder, variant).items() if not k.startswith(skip)}
    return jax.tree.map(jnp.asarray, torch_to_flax(state, expected, rename=rename, where=where))
