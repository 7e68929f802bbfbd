"""Model families and named models: `register_model`, `get_spec`, `build_model`, `from_pretrained`.

A *family* knows how to build a Flax module from a `ModelSpec` and, optionally, how to read a local diffusers folder.
Every family's module is called as `module.apply({"params": p}, x, t, cond)` with NHWC `x`, integer timesteps
`t` (B,) and a conditioning array (class labels (B,), ignored by unconditional models), and returns the model
output (eps or v, per the spec's schedule) in NHWC.

Families here: `conditional` (the project's class-conditional diffusers Flax UNets, e.g. the embedded MNIST model)
and `unet2d` (a Flax port of diffusers' `UNet2DModel`: DDPM CIFAR-10, LDM UNets), registered by their modules.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.diffusion.schedule import NoiseSchedule

CONDITIONING = ("class", "none", "text")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model: its family, the UNet config, the sample shape, conditioning, noise schedule and source folder."""

    name: str
    unet: dict[str, Any]
    image_size: int
    channels: int
    num_classes: int  # class labels (0: unconditional)
    description: str
    family: str = "conditional"
    conditioning: str = "class"  # 'class' | 'none' | 'text'
    schedule: NoiseSchedule = NoiseSchedule()  # DDPM linear, eps prediction, x0 clipped
    source: str = ""  # the folder it was read from ('' for embedded models)
    guidance_scale: float = 1.0  # classifier-free guidance (text models): > 1 runs 2 UNet passes per step
    decoder: dict | None = None  # latent models: {'scaling_factor', 'image_shape', 'config'}; decoded by the
    #                              module's `decode` method in full precision (not counted in BitOPs)
    attention: dict | None = None  # e.g. {'use_memory_efficient_attention': True, 'split_head_dim': False}

    @property
    def unet_passes_per_step(self) -> int:
        return 2 if self.guidance_scale > 1 else 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape of what metrics and sample files see: decoded images for latent models."""
        return tuple(self.decoder["image_shape"]) if self.decoder else self.sample_shape

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "conditioning": self.conditioning, "source": self.source,
                "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.unet.items()},
                "sample_shape": list(self.sample_shape), "image_shape": list(self.image_shape),
                "num_classes": self.num_classes,
                "schedule": self.schedule.to_dict(), "guidance_scale": self.guidance_scale,
                "unet_passes_per_step": self.unet_passes_per_step,
                "decoder": None if self.decoder is None else {
                    **{k: v for k, v in self.decoder.items() if k != "config"},
                    "note": "VAE decode in full precision, excluded from BitOPs"}}


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v.item() if isinstance(v, np.generic) else v


def spec_to_dict(spec: ModelSpec) -> dict:
    """Every field of a spec as JSON (the noise schedule whole), so `spec_from_dict` rebuilds an equal spec."""
    d = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    d["schedule"] = dataclasses.asdict(spec.schedule)
    return _jsonable(d)


def spec_from_dict(d: dict) -> ModelSpec:
    """The inverse of `spec_to_dict` (lists stay lists: the builders accept either); unknown or missing fields are a ValueError naming them."""
    names = {f.name for f in dataclasses.fields(ModelSpec)}
    required = {f.name for f in dataclasses.fields(ModelSpec) if f.default is dataclasses.MISSING}
    unknown, missing = sorted(set(d) - names), sorted(required - set(d))
    if unknown or missing:
        raise ValueError(f"model spec: unknown fields {unknown}, missing fields {missing}; valid: {sorted(names)}")
    d = dict(d)
    sched = dict(d.get("schedule") or {})
    if sched.get("trained_betas") is not None:
        sched["trained_betas"] = tuple(sched["trained_betas"])
    d["schedule"] = NoiseSchedule(**sched)
    return ModelSpec(**d)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """How to build, feed and load one kind of model."""

    name: str
    build: Callable[[ModelSpec, Any], Any]  # (spec, dtype) -> flax module
    example_inputs: Callable[[ModelSpec, int], tuple]  # (spec, batch) -> (x, t, cond)
    read_spec: Callable[[Path], ModelSpec] | None = None  # folder -> spec (configs only, no weights)
    load_params: Callable[[Path, ModelSpec, Any], Any] | None = None  # (folder, spec, param shapes) -> params
    detect: Callable[[Path], bool] | None = None  # does this folder hold this family?
    save_converted: Callable[[Path, ModelSpec, Any, Path], None] | None = None  # (src, spec, params, out dir)
    doc: str = ""


FAMILIES: dict[str, ModelFamily] = {}
MODEL_SPECS: dict[str, ModelSpec] = {}


def register_model(family: ModelFamily, specs: dict[str, ModelSpec] | None = None) -> None:
    """Make a family (and optionally named specs of it) available, like `register_metric` for metrics."""
    FAMILIES[family.name] = family
    for name, spec in (specs or {}).items():
        if spec.family != family.name:
            raise ValueError(f"spec {name!r} has family {spec.family!r}, registered under {family.name!r}")
        MODEL_SPECS[name] = spec


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; valid: {sorted(FAMILIES)}")
    return FAMILIES[name]


def get_spec(name: str) -> ModelSpec:
    if name not in MODEL_SPECS:
        hint = (f"; {name!r} is a model family: give its folder with --config.model_dir=PATH"
                if name in FAMILIES else "")
        raise ValueError(f"unknown model {name!r}; valid names: {sorted(MODEL_SPECS)}{hint}")
    return MODEL_SPECS[name]


def _spec(spec: ModelSpec | str) -> ModelSpec:
    return get_spec(spec) if isinstance(spec, str) else spec


def build_model(spec: ModelSpec | str, dtype: Any = jnp.float32):
    spec = _spec(spec)
    return get_family(spec.family).build(spec, dtype)


def example_inputs(spec: ModelSpec | str, batch: int = 1):
    spec = _spec(spec)
    return get_family(spec.family).example_inputs(spec, batch)


def param_shapes(spec: ModelSpec | str, dtype: Any = jnp.float32):
    """Parameter ShapeDtypeStructs via `jax.eval_shape`: no compile, no FLOPs, fine for an 860M-param UNet."""
    spec = _spec(spec)
    return jax.eval_shape(build_model(spec, dtype).init, jax.random.key(0), *example_inputs(spec))["params"]


def init_params(spec: ModelSpec | str, key: jax.Array):
    """Initialise parameters (small models). Use `param_shapes` for large ones."""
    spec = _spec(spec)
    return jax.jit(build_model(spec).init)(key, *example_inputs(spec))["params"]


def count_params(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


# --- local folders -------------------------------------------------------------------------------------------------


def detect_family(path: str | Path) -> ModelFamily:
    """The family whose `detect` accepts the folder; a clear error if none does."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder {str(p)!r} does not exist. Nothing is downloaded at run time: "
                                "download it first (e.g. `huggingface-cli download google/ddpm-cifar10-32 "
                                "--local-dir PATH`)")
    hits = [f for f in FAMILIES.values() if f.detect is not None and f.detect(p)]
    if not hits:
        found = sorted(x.name for x in p.iterdir())[:12]
        raise ValueError(f"{str(p)!r} is not a model folder of any known family "
                         f"{sorted(n for n, f in FAMILIES.items() if f.detect)}; it holds {found}. Expected a "
                         "diffusers folder with config.json (e.g. UNet2DModel) and scheduler_config.json")
    return hits[0]


def read_spec(path: str | Path, family: str | None = None) -> ModelSpec:
    """The spec of a local folder from its config files only (no weights read): checked before long work."""
    fam = detect_family(path) if family is None else get_family(family)
    if fam.read_spec is None:
        raise ValueError(f"model family {fam.name!r} has no folder loader")
    if family is not None and fam.detect is not None and not fam.detect(Path(path)):
        found = detect_family(path).name
        raise ValueError(f"{str(path)!r} holds a {found!r} model, not {family!r}; set --config.model={found!r}")
    return fam.read_spec(Path(path))


def from_pretrained(path: str | Path, dtype: Any = jnp.float32, family: str | None = None, **spec_overrides):
    """(model, params, spec) of a local diffusers folder (or one written by `experiments/convert.py`).

    `spec_overrides` replace spec fields before the model is built (e.g. `num_classes` = the number of prompts
    and `guidance_scale` of a text-to-image model, whose prompt tables are then zeros to be filled)."""
    spec = read_spec(path, family)
    if spec_overrides:
        spec = dataclasses.replace(spec, **spec_overrides)
    fam = get_family(spec.family)
    model = build_model(spec, dtype)
    params = fam.load_params(Path(path), spec, param_shapes(spec, dtype))
    if dtype != jnp.float32:
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    return model, params, spec


def convert_folder(path: str | Path, out: str | Path, family: str | None = None) -> ModelSpec:
    """Read a folder's PyTorch weights once and write Flax params (msgpack) plus its configs to `out`, a folder
    that `from_pretrained` then loads without conversion."""
    src, out = Path(path), Path(out)
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {str(out)!r} is the source folder; choose another directory")
    _, params, spec = from_pretrained(src, family=family)
    fam = get_family(spec.family)
    if fam.save_converted is None:
        raise ValueError(f"model family {fam.name!r} cannot write converted folders")
    out.mkdir(parents=True, exist_ok=True)
    fam.save_converted(src, spec, params, out)
    return spec


def folder_digest(path: str | Path) -> str:
    """sha256 over a model folder's config, scheduler and weight files (what a resume must not see change).
    Hashed once per process for an unchanged folder (names, sizes and mtimes), since SD folders hold GBs."""
    root = Path(path)
    files = sorted(f for f in root.rglob("*") if f.is_file() and (
        f.suffix in (".json", ".safetensors", ".bin", ".msgpack")))
    if not files:
        raise FileNotFoundError(f"model folder {str(root)!r} holds no config or weight files")
    listing = tuple((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _hash_files(str(root.resolve()), listing)


@functools.lru_cache(maxsize=8)
def _hash_files(root: str, listing: tuple) -> str:
    h = hashlib.sha256()
    for rel, _, _ in listing:
        h.update(rel.encode())
        with open(Path(root) / rel, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def is_int(v: Any) -> bool:
    """An integer config value (JSON/numpy), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v: Any) -> bool:
    """A real-number config value (JSON/numpy), not a bool."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} is missing")
    try:
        out = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(out, dict):
        raise ValueError(f"{what} {str(path)!r} must hold a JSON object, got {type(out).__name__}")
    return out
