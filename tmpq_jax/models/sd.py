"""The `sd` family: Stable Diffusion 1.x / 2.x (Rombach et al. 2022) from a local diffusers pipeline folder.

The denoiser is diffusers' own `FlaxUNet2DConditionModel` and the decoder its `FlaxAutoencoderKL` (decoder half
only), wrapped in `TextToImageUNet`, which holds the prompt embeddings as data (prompt tables, filled by the caller
with text-encoder outputs) and applies classifier-free guidance (Ho & Salimans 2022). Called like every family:
`module.apply({"params": p}, x, t, prompt_index)` with NHWC latents; `decode` turns latents into NHWC images.

Accepted layouts: a diffusers `StableDiffusionPipeline` folder (`model_index.json`, `unet/`, `vae/`, `scheduler/`,
PyTorch weights), or one written by `save_sd` (`diffusion_flax_model.msgpack` in `unet/` and `vae/`). Nothing is
ever downloaded.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from tmpq_jax import checkpoint
from tmpq_jax.diffusion import guided
from tmpq_jax.diffusion.schedule import NoiseSchedule
from tmpq_jax.models.pretrained import FLAX_WEIGHTS, load_component
from tmpq_jax.models.registry import ModelFamily, ModelSpec, is_int, is_number, read_json, register_model

__all__ = ["TextToImageUNet", "detect_sd", "read_sd_spec", "check_sd_unet_config", "check_sd_vae_config",
           "build_sd", "sd_inputs", "load_sd_params", "save_sd", "vae_rename", "FLAX_WEIGHTS", "DOWNLOAD_HINT"]

UNET_CLASS = "UNet2DConditionModel"
VAE_CLASS = "AutoencoderKL"
SUBFOLDERS = ("unet", "vae", "scheduler")
COPIED_FOLDERS = ("text_encoder", "tokenizer")  # carried over by `save_sd` (the caller's text encoder)
DOWNLOAD_HINT = ("Nothing is downloaded at run time: download the pipeline first, e.g. `huggingface-cli download "
                 "stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir PATH` (or "
                 "stabilityai/stable-diffusion-2-1-base)")
DEFAULT_ATTENTION = {"use_memory_efficient_attention": False, "split_head_dim": False}


def _quiet_flax_deprecation() -> None:
    """diffusers 0.39 logs "Flax classes are deprecated" from every Flax module's setup (hundreds per trace); drop
    exactly that message from the loggers of the Flax modules used here."""
    class _Drop(logging.Filter):
        def filter(self, record):
            return "Flax classes are deprecated" not in str(record.msg)

    for name in ("unets.unet_2d_condition_flax", "unets.unet_2d_blocks_flax", "attention_flax", "resnet_flax",
                 "embeddings_flax", "vae_flax", "modeling_flax_utils"):
        logger = logging.getLogger(f"diffusers.models.{name}")
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop())


_quiet_flax_deprecation()


# --- configs ------------------------------------------------------------------------------------------------------

# diffusers 0.39 `UNet2DConditionModel.__init__` defaults (a config.json leaves out keys at their default)
UNET_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    only_cross_attention=False, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, dropout=0.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
    transformer_layers_per_block=1, reverse_transformer_layers_per_block=None, encoder_hid_dim=None,
    encoder_hid_dim_type=None, attention_head_dim=8, num_attention_heads=None, dual_cross_attention=False,
    use_linear_projection=False, class_embed_type=None, addition_embed_type=None, addition_time_embed_dim=None,
    num_class_embeds=None, upcast_attention=False, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3,
    conv_out_kernel=3, projection_class_embeddings_input_dim=None, attention_type="default",
    class_embeddings_concat=False, mid_block_only_cross_attention=None, cross_attention_norm=None,
    addition_embed_type_num_heads=64,
)
# Keys the Flax class cannot express: accepted only at these values (which are what it computes), then dropped.
# `norm_num_groups` / `norm_eps`: the Flax blocks hard-code GroupNorm(32 groups, eps 1e-5).
UNET_FIXED: dict[str, tuple] = {
    "center_input_sample": (False,), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
    "act_fn": ("silu", "swish"), "norm_num_groups": (32,), "norm_eps": (1e-5,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,), "class_embed_type": (None,),
    "addition_embed_type": (None,), "num_class_embeds": (None,), "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,), "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,), "reverse_transformer_layers_per_block": (None,), "only_cross_attention": (False,),
}
# Keys dropped whatever their value, and why that is exact.
UNET_INERT = {
    "upcast_attention": "computes q.k in float32; the Flax model computes in its dtype, identical in float32",
    "addition_time_embed_dim": "read only with addition_embed_type (which must be null)",
    "addition_embed_type_num_heads": "read only with addition_embed_type (which must be null)",
    "projection_class_embeddings_input_dim": "read only with class/addition embeddings (which must be null)",
}
# `FlaxUNet2DConditionModel` arguments taken from the config (`num_attention_heads` folds into attention_head_dim)
UNET_FLAX_ARGS = ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
                  "mid_block_type", "block_out_channels", "layers_per_block", "attention_head_dim",
                  "cross_attention_dim", "dropout", "use_linear_projection", "flip_sin_to_cos", "freq_shift",
                  "transformer_layers_per_block")
_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID = ("UNetMidBlock2DCrossAttn", None)

# diffusers 0.39 `AutoencoderKL.__init__` defaults
VAE_DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
    block_out_channels=[64], layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=32, scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
    force_upcast=True, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
)
VAE_FIXED: dict[str, tuple] = {
    "act_fn": ("silu", "swish"), "out_channels": (3,), "shift_factor": (None,), "latents_mean": (None,),
    "latents_std": (None,), "use_post_quant_conv": (True,), "mid_block_add_attention": (True,),
}
VAE_INERT = {
    "force_upcast": "float16 pipelines only",
    "use_quant_conv": "quant_conv belongs to the encoder, which is not loaded",
}
VAE_FLAX_ARGS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                 "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor")


def _equal(v: Any, allowed: Any) -> bool:
    """`v == allowed` where True is not 1 and None is only None."""
    if allowed is None or isinstance(allowed, bool):
        return v is allowed or (isinstance(v, (bool, np.bool_)) and isinstance(allowed, bool) and v == allowed)
    if isinstance(v, (bool, np.bool_)) or v is None:
        return False
    if is_number(allowed):
        return is_number(v) and math.isclose(float(v), float(allowed), rel_tol=1e-9, abs_tol=0.0)
    return v == allowed


def _bad(what: str, source: str, field: str, value: Any, supported: Any) -> ValueError:
    return ValueError(f"{what} {source!r}: {field}={value!r} is not supported by the sd family "
                      f"(diffusers' Flax classes cannot express it); supported: {supported}")


def _with_defaults(config: dict, defaults: dict, fixed: dict, what: str, source: str, cls: str, bad) -> dict:
    """Known keys only ('_' keys are metadata), diffusers' defaults filled in, pinned values checked."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ValueError(f"{what} {source!r}: unknown key(s) {unknown}; this diffusers version's {cls} has no "
                         "such argument")
    cfg = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for k, allowed in fixed.items():
        if not any(_equal(cfg[k], a) for a in allowed):
            raise bad(k, cfg[k], " or ".join(repr(a) for a in allowed))
    return cfg


def _square_size(size: Any, bad, what: str) -> int:
    """sample_size as one int: an int, or a [n, n] pair."""
    s = size[0] if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1] else size
    if not is_int(s) or s < 1:
        raise bad("sample_size", size, f"a positive int ({what})")
    return int(s)


def _per_block(cfg: dict, key: str, n: int, bad) -> list:
    """An int or a list of one int per block -> list of n positive ints."""
    v = cfg[key]
    vals = list(v) if isinstance(v, (list, tuple)) else [v] * n
    if len(vals) != n or not all(is_int(x) and x > 0 for x in vals):
        raise bad(key, v, f"a positive int or a list of {n} positive ints")
    return [int(x) for x in vals]


def check_sd_unet_config(config: dict, source: str = "unet/config.json") -> dict:
    """A diffusers `UNet2DConditionModel` config -> the `FlaxUNet2DConditionModel` arguments computing the same
    network (lists as tuples). Keys starting with '_' are metadata; unknown keys and values the Flax class cannot
    express raise a ValueError naming the field, its value and `source`."""
    what = "UNet2DConditionModel config"

    def bad(field, value, supported):
        return _bad(what, source, field, value, supported)

    # 1. known keys only, with diffusers' defaults; 2. network changes the Flax class cannot express
    config = dict(config)
    if isinstance(config.get("only_cross_attention"), list) and not any(config["only_cross_attention"]):
        config["only_cross_attention"] = False
    cfg = _with_defaults(config, UNET_DEFAULTS, UNET_FIXED, what, source, "UNet2DConditionModel", bad)
    # 3. blocks
    bo = cfg["block_out_channels"]
    if not isinstance(bo, (list, tuple)) or not bo or not all(is_int(c) and c > 0 for c in bo):
        raise bad("block_out_channels", bo, "a non-empty list of positive ints")
    n = len(bo)
    for k, allowed in (("down_block_types", _DOWN), ("up_block_types", _UP)):
        types = cfg[k]
        if not isinstance(types, (list, tuple)) or len(types) != n:
            raise bad(k, types, f"a list of {n} block types (one per block_out_channels entry)")
        for i, b in enumerate(types):
            if b not in allowed:
                raise bad(f"{k}[{i}]", b, list(allowed))
    if cfg["mid_block_type"] not in _MID:
        raise bad("mid_block_type", cfg["mid_block_type"], list(_MID))
    for c in bo:
        if c % 32:
            raise bad("block_out_channels", bo, "multiples of 32 (the Flax GroupNorms have 32 groups)")
    if cfg["time_embedding_dim"] is not None and not _equal(cfg["time_embedding_dim"], 4 * bo[0]):
        raise bad("time_embedding_dim", cfg["time_embedding_dim"], f"null or {4 * bo[0]} (4 * block_out_channels[0])")
    # 4. scalar types
    for k in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim"):
        if not is_int(cfg[k]) or cfg[k] < 1:
            raise bad(k, cfg[k], "a positive int (one value for all blocks)")
    if cfg["in_channels"] != cfg["out_channels"]:
        raise bad("out_channels", cfg["out_channels"], f"in_channels={cfg['in_channels']} (a denoiser predicts a "
                  "tensor shaped like its input; inpainting UNets are not supported)")
    for k in ("flip_sin_to_cos", "use_linear_projection"):
        if not isinstance(cfg[k], bool):
            raise bad(k, cfg[k], "true or false")
    for k in ("freq_shift", "dropout"):
        if not is_number(cfg[k]):
            raise bad(k, cfg[k], "a number")
    s = _square_size(cfg["sample_size"], bad, "square latents")
    # 5. heads: the Flax class (like diffusers' PyTorch one) reads attention_head_dim as the number of heads
    heads_key = "num_attention_heads" if cfg["num_attention_heads"] is not None else "attention_head_dim"
    heads = _per_block(cfg, heads_key, n, bad)
    for i, (c, h) in enumerate(zip(bo, heads)):
        if c % h:
            raise bad(heads_key, cfg[heads_key], f"head counts dividing block_out_channels (block {i}: {c} % {h})")
    layers = _per_block(cfg, "transformer_layers_per_block", n, bad)
    # 6. the Flax arguments
    out = {k: cfg[k] for k in UNET_FLAX_ARGS}
    out.update(sample_size=int(s), block_out_channels=tuple(int(c) for c in bo),
               down_block_types=tuple(cfg["down_block_types"]), up_block_types=tuple(cfg["up_block_types"]),
               attention_head_dim=tuple(heads) if isinstance(cfg[heads_key], (list, tuple)) else heads[0],
               transformer_layers_per_block=(tuple(layers) if isinstance(cfg["transformer_layers_per_block"],
                                                                         (list, tuple)) else layers[0]),
               dropout=float(cfg["dropout"]), freq_shift=cfg["freq_shift"])
    return out


def check_sd_vae_config(config: dict, source: str = "vae/config.json") -> dict:
    """A diffusers `AutoencoderKL` config -> the `FlaxAutoencoderKL` arguments (same rules as the UNet's)."""
    what = "AutoencoderKL config"

    def bad(field, value, supported):
        return _bad(what, source, field, value, supported)

    cfg = _with_defaults(config, VAE_DEFAULTS, VAE_FIXED, what, source, "AutoencoderKL", bad)
    bo = cfg["block_out_channels"]
    if not isinstance(bo, (list, tuple)) or not bo or not all(is_int(c) and c > 0 for c in bo):
        raise bad("block_out_channels", bo, "a non-empty list of positive ints")
    for k, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = cfg[k]
        if not isinstance(types, (list, tuple)) or len(types) != len(bo) or any(b != allowed for b in types):
            raise bad(k, types, f"{len(bo)} x {allowed!r}")
    for k in ("in_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
        if not is_int(cfg[k]) or cfg[k] < 1:
            raise bad(k, cfg[k], "a positive int")
    if any(c % cfg["norm_num_groups"] for c in bo):
        raise bad("norm_num_groups", cfg["norm_num_groups"], f"a divisor of every block_out_channels {list(bo)}")
    if not is_number(cfg["scaling_factor"]) or not cfg["scaling_factor"] > 0:
        raise bad("scaling_factor", cfg["scaling_factor"], "a positive number")
    s = _square_size(cfg["sample_size"], bad, "square images")
    out = {k: cfg[k] for k in VAE_FLAX_ARGS}
    out.update(block_out_channels=tuple(int(c) for c in bo), down_block_types=tuple(cfg["down_block_types"]),
               up_block_types=tuple(cfg["up_block_types"]), sample_size=int(s),
               scaling_factor=float(cfg["scaling_factor"]))
    return out


# --- folders ------------------------------------------------------------------------------------------------------


def _component_class(path: Path, name: str, index: dict) -> str | None:
    """`_class_name` of `path/name/config.json`, else the class `model_index.json` names for the component."""
    f = path / name / "config.json"
    if f.is_file():
        try:
            return read_json(f, f"{name} config").get("_class_name")
        except ValueError:
            return None
    entry = index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def detect_sd(path: Path) -> bool:
    """A Stable Diffusion pipeline folder: `model_index.json`, a UNet2DConditionModel and an AutoencoderKL (read
    from `unet/config.json` and `vae/config.json`, or from model_index.json where a subfolder is missing, so that
    `read_sd_spec` can say which subfolder is missing)."""
    path = Path(path)
    f = path / "model_index.json"
    if not f.is_file():
        return False
    try:
        index = read_json(f, "pipeline index")
    except ValueError:
        return False
    return _component_class(path, "unet", index) == UNET_CLASS and _component_class(path, "vae", index) == VAE_CLASS


def _require_subfolders(path: Path) -> None:
    for name in SUBFOLDERS:
        if not (path / name).is_dir():
            present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            raise FileNotFoundError(f"Stable Diffusion folder {str(path)!r} has no {name}/ subfolder (it holds "
                                    f"{present}); a pipeline folder needs {', '.join(s + '/' for s in SUBFOLDERS)}. "
                                    f"{DOWNLOAD_HINT}")


def read_sd_spec(path: Path) -> ModelSpec:
    """The spec of a Stable Diffusion pipeline folder from its config files only (no weights read).

    `num_classes` (the number of prompts) is 0 here; the caller sets it and `guidance_scale` through
    `from_pretrained(..., num_classes=P, guidance_scale=g)` and fills the prompt tables."""
    path = Path(path)
    # 1. layout
    if not path.is_dir():
        raise FileNotFoundError(f"Stable Diffusion folder {str(path)!r} does not exist. {DOWNLOAD_HINT}")
    _require_subfolders(path)
    # 2. configs
    unet_file, vae_file = path / "unet" / "config.json", path / "vae" / "config.json"
    unet_cfg = read_json(unet_file, "UNet config")
    if unet_cfg.get("_class_name") != UNET_CLASS:
        raise ValueError(f"{str(unet_file)!r} holds a {unet_cfg.get('_class_name')!r}, not a {UNET_CLASS}")
    vae_cfg = read_json(vae_file, "VAE config")
    if vae_cfg.get("_class_name") != VAE_CLASS:
        raise ValueError(f"{str(vae_file)!r} holds a {vae_cfg.get('_class_name')!r}, not an {VAE_CLASS}")
    unet = check_sd_unet_config(unet_cfg, str(unet_file))
    vae = check_sd_vae_config(vae_cfg, str(vae_file))
    if unet["in_channels"] != vae["latent_channels"]:
        raise ValueError(f"{str(unet_file)!r}: in_channels={unet['in_channels']} differs from the VAE's "
                         f"latent_channels={vae['latent_channels']} ({str(vae_file)!r})")
    # 3. the decoded image: latent size * 2 ** (number of VAE upsamplers)
    side = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    decoder = {"scaling_factor": vae["scaling_factor"], "image_shape": [side, side, vae["out_channels"]],
               "config": vae}
    return ModelSpec(
        name=f"sd:{path.resolve().name}", unet=unet, image_size=unet["sample_size"], channels=unet["in_channels"],
        num_classes=0, description=f"Stable Diffusion (diffusers UNet2DConditionModel + AutoencoderKL) from "
                                   f"{str(path)!r}",
        family="sd", conditioning="text", schedule=NoiseSchedule.from_folder(path), source=str(path),
        decoder=decoder, attention=dict(DEFAULT_ATTENTION))


# --- the module ---------------------------------------------------------------------------------------------------


def _static(x: Any) -> Any:
    """A hashable form of a config value: lists -> tuples, dicts -> sorted item tuples."""
    if isinstance(x, dict):
        return tuple(sorted((k, _static(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_static(v) for v in x)
    return x


class TextToImageUNet(nn.Module):
    """Text-conditioned latent denoiser: diffusers' Flax SD UNet with prompt tables and classifier-free guidance
    (Ho & Salimans 2022: out = u + s (c - u)), plus the VAE decoder (Rombach et al. 2022) as `decode`.

    `prompt_embeds` / `negative_embeds` (P, context_length, cross_attention_dim) are parameters only so that they
    travel with the params tree; they are data (text-encoder outputs set by the caller), not quantized."""

    unet_config: tuple  # sorted (key, value) items of the FlaxUNet2DConditionModel arguments, lists as tuples
    vae_config: tuple  # the same for FlaxAutoencoderKL
    num_prompts: int
    context_length: int = 77
    guidance_scale: float = 1.0
    scaling_factor: float = 0.18215
    use_memory_efficient_attention: bool = False
    split_head_dim: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

        cfg = dict(self.unet_config)
        self.unet = FlaxUNet2DConditionModel(**cfg, use_memory_efficient_attention=self.use_memory_efficient_attention,
                                             split_head_dim=self.split_head_dim, dtype=self.dtype)
        self.vae = FlaxAutoencoderKL(**dict(self.vae_config), dtype=self.dtype)
        shape = (max(int(self.num_prompts), 1), self.context_length, int(cfg["cross_attention_dim"]))
        self.prompt_embeds = self.param("prompt_embeds", nn.initializers.zeros, shape, jnp.float32)
        self.negative_embeds = self.param("negative_embeds", nn.initializers.zeros, shape, jnp.float32)

    def denoise(self, x, t, context):
        """One UNet call: NHWC latents, (B,) timesteps, (B, L, D) text embeddings -> NHWC output."""
        out = self.unet(jnp.transpose(x, (0, 3, 1, 2)), t, context, return_dict=False)[0]
        return jnp.transpose(out, (0, 2, 3, 1))

    def __call__(self, x, t, prompt_index):
        b = x.shape[0]
        # 1. per-sample timesteps and prompt rows
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        idx = jnp.broadcast_to(jnp.asarray(prompt_index, jnp.int32), (b,))
        cond, uncond = self.prompt_embeds[idx], self.negative_embeds[idx]
        # 2. one UNet pass (scale 1) or one 2B pass [uncond; cond] with guidance
        out = guided(self.denoise, self.guidance_scale)(x, t, (cond, uncond))
        # 3. `init` / `eval_shape(init)` also creates the decoder's params
        if self.is_initializing():
            self.decode(jnp.zeros((1, *x.shape[1:]), x.dtype))
        return out

    def decode(self, z, clip: bool = True):
        """NHWC latents -> NHWC images in [-1, 1] (diffusers: `vae.decode(latents / scaling_factor)`)."""
        img = self.vae.decode(z / self.scaling_factor, return_dict=False)[0]
        img = jnp.transpose(img, (0, 2, 3, 1))
        return jnp.clip(img, -1.0, 1.0) if clip else img


def _attention_flags(spec: ModelSpec) -> dict:
    flags = {**DEFAULT_ATTENTION, **(spec.attention or {})}
    unknown = sorted(set(flags) - set(DEFAULT_ATTENTION))
    if unknown:
        raise ValueError(f"spec.attention: unknown key(s) {unknown}; valid: {sorted(DEFAULT_ATTENTION)}")
    return {k: bool(v) for k, v in flags.items()}


def build_sd(spec: ModelSpec, dtype: Any = jnp.float32) -> TextToImageUNet:
    if spec.decoder is None or "config" not in spec.decoder:
        raise ValueError(f"spec {spec.name!r} has no VAE decoder config; read it with read_sd_spec")
    return TextToImageUNet(unet_config=_static(spec.unet), vae_config=_static(spec.decoder["config"]),
                           num_prompts=int(spec.num_classes), guidance_scale=float(spec.guidance_scale),
                           scaling_factor=float(spec.decoder["scaling_factor"]), dtype=dtype,
                           **_attention_flags(spec))


def sd_inputs(spec: ModelSpec, batch: int = 1):
    """(latents NHWC, timesteps, prompt indices), all zeros."""
    return (jnp.zeros((batch, *spec.sample_shape), jnp.float32), jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch,), jnp.int32))


# --- weights ------------------------------------------------------------------------------------------------------

_VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_VAE_ATTENTION_RE = re.compile(r"\.attentions\.(\d+)\.(to_q|to_k|to_v|to_out\.0)\.")
# The encoder half, not used to sample (`decode` only); its tensors are skipped.
VAE_SKIPPED = ("encoder.", "quant_conv.")


def vae_rename(key: str) -> str:
    """PyTorch AutoencoderKL names -> FlaxAutoencoderKL's: the mid-block attention's `to_q/to_k/to_v/to_out.0` are
    `query/key/value/proj_attn` in Flax (checkpoints from before diffusers 0.14 already use those names)."""
    return _VAE_ATTENTION_RE.sub(lambda m: f".attentions.{m.group(1)}.{_VAE_ATTENTION[m.group(2)]}.", key)


def load_sd_params(path: Path, spec: ModelSpec, shapes: Any) -> dict:
    """{'unet', 'vae', 'prompt_embeds', 'negative_embeds'} matching `shapes` (from `jax.eval_shape` of `init`).

    UNet names map mechanically (`down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj` ->
    `down_blocks_0/attentions_0/transformer_blocks_0/ff/net_0/proj`; `proj_in/out` 1x1 convs or Linears onto
    whichever the config gives); the VAE uses `vae_rename` and only its decoder half is read. Every missing,
    unexpected or mis-shaped tensor of a component is named in one WeightsError. Prompt tables are zeros."""
    path = Path(path)
    shapes = unfreeze(shapes) if not isinstance(shapes, dict) else dict(shapes)
    params = {"unet": load_component(path / "unet", shapes["unet"], hint=DOWNLOAD_HINT),
              "vae": load_component(path / "vae", shapes["vae"], rename=vae_rename, skip=VAE_SKIPPED,
                                    hint=DOWNLOAD_HINT)}
    for k in ("prompt_embeds", "negative_embeds"):
        params[k] = jnp.zeros(shapes[k].shape, jnp.float32)
    return params


def save_sd(src: Path, spec: ModelSpec, params: Any, out: Path) -> None:
    """A pipeline folder `load_sd_params` reads without conversion: configs copied from `src`, Flax weights of the
    UNet and VAE decoder as msgpack, and `text_encoder/`, `tokenizer/` copied when present. Prompt tables (data)
    are not saved."""
    src, out = Path(src), Path(out)
    # 1. configs
    files = ["model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
    for rel in files:
        if (src / rel).is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, out / rel)
    # 2. weights
    checkpoint.save_tree(out / "unet" / FLAX_WEIGHTS, params["unet"])
    checkpoint.save_tree(out / "vae" / FLAX_WEIGHTS, params["vae"])
    # 3. the text encoder and tokenizer, for the caller that builds prompt tables
    for name in COPIED_FOLDERS:
        if (src / name).is_dir():
            shutil.copytree(src / name, out / name, dirs_exist_ok=True)


def _named_spec(name: str, unet_cfg: dict, vae_cfg: dict, schedule: NoiseSchedule, description: str) -> ModelSpec:
    """A built-in SD spec (random weights via `param_shapes` / benchmarks): one prompt row, guidance 7.5."""
    unet, vae = check_sd_unet_config(unet_cfg, name), check_sd_vae_config(vae_cfg, name)
    side = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    return ModelSpec(name=name, unet=unet, image_size=unet["sample_size"], channels=unet["in_channels"],
                     num_classes=1, description=description, family="sd", conditioning="text", schedule=schedule,
                     guidance_scale=7.5, decoder={"scaling_factor": vae["scaling_factor"],
                                                  "image_shape": [side, side, vae["out_channels"]], "config": vae},
                     attention={"use_memory_efficient_attention": True, "split_head_dim": False})


# Stable Diffusion 1.x shapes (the published v1-5 unet/ and vae/ configs), for benchmarks with random weights
SD_SPECS = {"sd-1.x": _named_spec(
    "sd-1.x",
    dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
         attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
         down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
         up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
    dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
         block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
         up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215),
    NoiseSchedule(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1),
    "Stable Diffusion 1.x shapes: 64x64x4 latents, 77-token CLIP context (768-d), guidance 7.5, VAE to 512x512")}


register_model(ModelFamily(
    "sd", build_sd, sd_inputs, read_sd_spec, load_sd_params, detect_sd, save_sd,
    doc="Stable Diffusion 1.x/2.x pipeline folders (UNet2DConditionModel + AutoencoderKL), run in diffusers' Flax "
        "classes with prompt tables and classifier-free guidance; VAE decode outside the quantized model"),
    SD_SPECS)
