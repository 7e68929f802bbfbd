"""Model families read from local diffusers folders.

`unet2d`: a `UNet2DModel` (google/ddpm-cifar10-32, LDM UNets) with its noise schedule. Accepted layouts:
- a model folder: `config.json` (`_class_name` UNet2DModel), weights, and `scheduler_config.json`;
- a pipeline folder: `unet/` (config and weights) and `scheduler/scheduler_config.json`;
- a folder written by `experiments/convert.py` (`diffusion_flax_model.msgpack` instead of PyTorch weights).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from tmpq_jax import checkpoint
from tmpq_jax.diffusion.schedule import NoiseSchedule
from tmpq_jax.models import unet2d
from tmpq_jax.models.pretrained import FLAX_WEIGHTS, load_component
from tmpq_jax.models.registry import ModelFamily, ModelSpec, read_json, register_model

UNET2D_CLASS = "UNet2DModel"


def unet2d_dir(path: Path) -> Path | None:
    """The folder holding the UNet2DModel config: `path` itself or `path/unet`."""
    for d in (path, path / "unet"):
        f = d / "config.json"
        if f.is_file():
            try:
                if read_json(f, "config").get("_class_name") == UNET2D_CLASS:
                    return d
            except ValueError:
                continue
    return None


def _is_unet2d(path: Path) -> bool:
    return unet2d_dir(path) is not None


def read_unet2d_spec(path: Path) -> ModelSpec:
    d = unet2d_dir(path)
    if d is None:
        raise ValueError(f"{str(path)!r} holds no UNet2DModel config.json (checked {str(path / 'config.json')!r} "
                         f"and {str(path / 'unet' / 'config.json')!r})")
    config = unet2d.check_unet2d_config(read_json(d / "config.json", "UNet2DModel config"))
    size = config["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{str(d / 'config.json')!r}: sample_size={size!r}; only square samples are supported")
        size = size[0]
    if config["in_channels"] != config["out_channels"]:
        raise ValueError(f"{str(d / 'config.json')!r}: in_channels={config['in_channels']} != out_channels="
                         f"{config['out_channels']}; a denoiser predicts a tensor shaped like its input")
    if config.get("class_embed_type") is not None:
        raise ValueError(f"{str(d / 'config.json')!r}: class_embed_type={config['class_embed_type']!r} takes "
                         "continuous class conditioning, which the search does not supply; supported: unconditional "
                         "models and integer labels via num_class_embeds")
    num_classes = int(config.get("num_class_embeds") or 0)
    return ModelSpec(
        name=f"unet2d:{path.resolve().name}", unet=config, image_size=int(size), channels=int(config["in_channels"]),
        num_classes=num_classes, description=f"diffusers UNet2DModel from {str(path)!r}", family="unet2d",
        conditioning="class" if num_classes else "none", schedule=NoiseSchedule.from_folder(path),
        source=str(path))


def load_unet2d_params(path: Path, spec: ModelSpec, shapes: Any):
    return load_component(unet2d_dir(path), shapes, rename=unet2d.unet2d_rename)


def build_unet2d(spec: ModelSpec, dtype: Any = jnp.float32):
    return unet2d.UNet2D(config=unet2d.config_to_static(spec.unet), dtype=dtype)


def unet2d_inputs(spec: ModelSpec, batch: int = 1):
    return (jnp.zeros((batch, *spec.sample_shape), jnp.float32), jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch,), jnp.int32))


def save_unet2d(src: Path, spec: ModelSpec, params: Any, out: Path) -> None:
    """A model-folder layout: config.json, scheduler_config.json and diffusion_flax_model.msgpack."""
    shutil.copyfile(unet2d_dir(src) / "config.json", out / "config.json")
    out.joinpath("scheduler_config.json").write_text(json.dumps(spec.schedule.to_dict(), indent=2) + "\n")
    checkpoint.save_tree(out / FLAX_WEIGHTS, params)


# The published google/ddpm-cifar10-32 configs, for benchmarks and shapes with random weights (a downloaded folder
# loads with --config.model_dir / from_pretrained)
DDPM_CIFAR10_CONFIG = {
    "_class_name": UNET2D_CLASS, "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}
DDPM_CIFAR10_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                          "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
                          "trained_betas": None, "variance_type": "fixed_large"}
UNET2D_SPECS = {"ddpm-cifar10-32": ModelSpec(
    name="ddpm-cifar10-32", unet=unet2d.check_unet2d_config(DDPM_CIFAR10_CONFIG), image_size=32, channels=3,
    num_classes=0, description="google/ddpm-cifar10-32 shapes (35.7M params), random weights unless loaded from "
                               "its folder", family="unet2d", conditioning="none",
    schedule=NoiseSchedule.from_scheduler_config(DDPM_CIFAR10_SCHEDULER))}


register_model(ModelFamily("unet2d", build_unet2d, unet2d_inputs, read_unet2d_spec, load_unet2d_params, _is_unet2d,
                           save_unet2d, doc="diffusers UNet2DModel folders (DDPM CIFAR-10, LDM UNets), ported to Flax"),
               UNET2D_SPECS)
