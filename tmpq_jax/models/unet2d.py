"""A Flax Linen port of diffusers' PyTorch `UNet2DModel` (the DDPM UNet, Ho et al. 2020, Appendix B) and its loader.

Submodules are named like the PyTorch module tree with numbers joined by '_' (`down_blocks_1/attentions_0/to_q`),
so `pretrained.torch_to_flax` converts a diffusers checkpoint mechanically. Every conv / linear is an `nn.Conv` /
`nn.Dense`, and the two attention products are `matmul` sites (`SelfAttention2D.hooked_call`), so
`tmpq_jax.quant.discover_sites` sees every product. Inputs and outputs are NHWC.
"""

from __future__ import annotations

import math
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.models.pretrained import FLAX_WEIGHTS, WeightsError, load_component
from tmpq_jax.models.registry import is_int, is_number, read_json

__all__ = ["UNet2D", "SelfAttention2D", "check_unet2d_config", "config_to_static", "unet2d_rename", "load_unet2d",
           "example_inputs_unet2d", "FLAX_WEIGHTS"]


# --- config -------------------------------------------------------------------------------------------------------

# diffusers 0.39 `UNet2DModel.__init__` defaults
DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    mid_block_type="UNetMidBlock2D", up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[224, 448, 672, 896], layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None,
)
# accepted only with this value and dropped (not a UNet2DModel argument; diffusers ignores it)
_TOLERATED = {"time_embedding_act_fn": None}

_CHOICES: dict[str, tuple] = {
    "time_embedding_type": ("positional", "fourier"),
    "mid_block_type": ("UNetMidBlock2D", None),
    "downsample_type": ("conv", None),
    "upsample_type": ("conv", None),
    "act_fn": ("silu", "swish", "mish", "gelu", "relu"),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "class_embed_type": (None, "timestep", "identity"),
}
_DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")


def _unsupported(field: str, value: Any, supported: Any) -> ValueError:
    return ValueError(f"UNet2DModel config: {field}={value!r} is not supported; supported: {supported}")


def check_unet2d_config(config: dict) -> dict:
    """Validate a diffusers `UNet2DModel` config.json dict; return the full config with diffusers' defaults.

    Keys starting with '_' are ignored. Unknown keys and unsupported values raise a ValueError naming the field,
    the value and what is supported.
    """
    if not isinstance(config, dict):
        raise ValueError(f"UNet2DModel config must be a dict, got {type(config).__name__}")
    cfg = dict(DEFAULTS)
    for k, v in config.items():
        if k.startswith("_"):
            continue
        if k in _TOLERATED:
            if v != _TOLERATED[k]:
                raise _unsupported(k, v, [_TOLERATED[k]])
            continue
        if k not in DEFAULTS:
            raise ValueError(f"UNet2DModel config: unknown field {k!r} (value {v!r}); known fields: "
                             f"{sorted(DEFAULTS)}")
        cfg[k] = list(v) if isinstance(v, tuple) else v
    # 1. enumerated values
    for k, choices in _CHOICES.items():
        if cfg[k] not in choices:
            raise _unsupported(k, cfg[k], list(choices))
    for k, allowed in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
        if not isinstance(cfg[k], list) or not cfg[k]:
            raise _unsupported(k, cfg[k], f"a non-empty list of {list(allowed)}")
        for i, b in enumerate(cfg[k]):
            if b not in allowed:
                raise _unsupported(f"{k}[{i}]", b, list(allowed))
    # 2. types and ranges
    for k in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
        if not is_int(cfg[k]) or cfg[k] < 1:
            raise _unsupported(k, cfg[k], "a positive int")
    for k in ("time_embedding_dim", "num_class_embeds", "attn_norm_num_groups", "attention_head_dim",
              "num_train_timesteps"):
        if cfg[k] is not None and (not is_int(cfg[k]) or cfg[k] < 1):
            raise _unsupported(k, cfg[k], "None or a positive int")
    for k in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
        if not isinstance(cfg[k], bool):
            raise _unsupported(k, cfg[k], "true or false")
    for k in ("freq_shift", "mid_block_scale_factor", "dropout"):
        if not is_number(cfg[k]):
            raise _unsupported(k, cfg[k], "a number")
    if not is_number(cfg["norm_eps"]) or cfg["norm_eps"] <= 0:
        raise _unsupported("norm_eps", cfg["norm_eps"], "a positive number")
    if cfg["mid_block_scale_factor"] == 0:
        raise _unsupported("mid_block_scale_factor", 0, "a non-zero number")
    if not is_int(cfg["downsample_padding"]) or cfg["downsample_padding"] < 0:
        raise _unsupported("downsample_padding", cfg["downsample_padding"], "an int >= 0")
    s = cfg["sample_size"]
    if isinstance(s, tuple):
        s = cfg["sample_size"] = list(s)
    if not (s is None or (is_int(s) and s > 0) or (isinstance(s, list) and len(s) == 2 and all(
            is_int(x) and x > 0 for x in s))):
        raise _unsupported("sample_size", s, "None, a positive int or [height, width]")
    bo = cfg["block_out_channels"]
    if not isinstance(bo, list) or not bo or not all(is_int(c) and c > 0 for c in bo):
        raise _unsupported("block_out_channels", bo, "a non-empty list of positive ints")
    # 3. structure: as many blocks as channel counts, channels divisible by the norm groups, >= 1 attention head
    n = len(bo)
    for k in ("down_block_types", "up_block_types"):
        if len(cfg[k]) != n:
            raise ValueError(f"UNet2DModel config: {k} has {len(cfg[k])} entries but block_out_channels {bo} has "
                             f"{n}; they must match")
    g = cfg["norm_num_groups"]
    for c in bo:
        if c % g:
            raise _unsupported("norm_num_groups", g, f"a divisor of every block_out_channels entry {bo}")
    ag = cfg["attn_norm_num_groups"]
    if ag is not None and bo[-1] % ag:
        raise _unsupported("attn_norm_num_groups", ag, f"None or a divisor of block_out_channels[-1]={bo[-1]}")
    hd = cfg["attention_head_dim"]
    attn_channels = [c for c, t in zip(bo, cfg["down_block_types"]) if t.startswith("Attn")]
    attn_channels += [c for c, t in zip(bo[::-1], cfg["up_block_types"]) if t.startswith("Attn")]
    if cfg["mid_block_type"] is not None and cfg["add_attention"]:
        attn_channels.append(bo[-1])
    if hd is not None and any(c < hd for c in attn_channels):
        raise _unsupported("attention_head_dim", hd, f"None or at most the channels of every attention block "
                                                     f"{sorted(set(attn_channels))} (heads = channels // dim)")
    return cfg


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def config_to_static(config: dict) -> tuple:
    """A config dict as sorted (key, value) pairs with lists turned into tuples (hashable, for `UNet2D.config`)."""
    return tuple(sorted((k, _freeze(v)) for k, v in config.items()))


# --- layers -------------------------------------------------------------------------------------------------------


def _activation(name: str) -> Callable:
    """diffusers' `get_activation` (torch GELU is the exact erf form)."""
    return {"silu": nn.silu, "swish": nn.silu, "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
            "gelu": partial(nn.gelu, approximate=False), "relu": nn.relu}[name]


def _group_norm(groups: int, eps: float, dtype: Any, name: str) -> nn.GroupNorm:
    # torch.nn.GroupNorm: biased variance over (channels in group, H, W); two-pass variance for fp32 parity
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def _conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1,
          padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, name=name)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding (Vaswani et al. 2017, Sec. 3.5), as diffusers' `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of log(sigma) (Tancik et al. 2020; NCSN++, Song et al. 2021); param `weight`."""

    embedding_size: int

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.normal(16.0), (self.embedding_size,), jnp.float32)
        x = jnp.log(t.astype(jnp.float32))[:, None] * w[None, :] * 2 * np.pi
        return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D`: GN-act-conv, + time embedding (added, or scale/shift after GN), GN-act-conv."""

    reconstruction_block = True  # one unit of quant.reconstruct

    out_channels: int
    groups: int
    eps: float
    time_scale_shift: str = "default"
    output_scale_factor: float = 1.0
    act_fn: str = "silu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        act = _activation(self.act_fn)
        c = self.out_channels
        # 1. first conv
        h = act(_group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = _conv(c, 3, self.dtype, "conv1")(h)
        # 2. time embedding: h + proj(t) before norm2 ("default"), or norm2(h) * (1 + scale) + shift
        shift_mode = self.time_scale_shift == "scale_shift"
        t = nn.Dense(2 * c if shift_mode else c, dtype=self.dtype, name="time_emb_proj")(act(temb))
        t = t[:, None, None, :]
        norm2 = _group_norm(self.groups, self.eps, self.dtype, "norm2")
        if shift_mode:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + t)
        # 3. second conv (dropout: inference only), shortcut
        h = _conv(c, 3, self.dtype, "conv2")(act(h))
        if x.shape[-1] != c:
            x = _conv(c, 1, self.dtype, "conv_shortcut", padding=((0, 0), (0, 0)))(x)
        return (x + h) / self.output_scale_factor


class SelfAttention2D(nn.Module):
    """diffusers `Attention` as UNet2DModel uses it: GN, multi-head self-attention over H*W, to_out, residual.

    Softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, Eq. 1) with the softmax in fp32. `hooked_call` exposes the two
    products as quantization sites `<path>/qk` and `<path>/av` (see `tmpq_jax.quant.sites`).
    """

    reconstruction_block = True  # one unit of quant.reconstruct

    channels: int
    heads: int
    dim_head: int
    norm_groups: int | None
    eps: float
    rescale_output_factor: float = 1.0
    dtype: Any = jnp.float32

    def setup(self):
        inner = self.heads * self.dim_head
        self.group_norm = (_group_norm(self.norm_groups, self.eps, self.dtype, "group_norm")
                           if self.norm_groups else None)
        self.to_q = nn.Dense(inner, dtype=self.dtype)
        self.to_k = nn.Dense(inner, dtype=self.dtype)
        self.to_v = nn.Dense(inner, dtype=self.dtype)
        self.to_out_0 = nn.Dense(self.channels, dtype=self.dtype)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return self.hooked_call(lambda path, role, x: x, None, hidden_states)

    def hooked_call(self, operand_fn: Callable, record: Callable | None, hidden_states: jax.Array) -> jax.Array:
        path = "/".join(str(p) for p in self.path)
        b, hh, ww, c = hidden_states.shape
        n, d = hh * ww, self.dim_head
        residual = hidden_states
        # 1. norm, projections, heads into the batch: (B*heads, T, d)
        h = self.group_norm(hidden_states) if self.group_norm is not None else hidden_states
        h = h.reshape(b, n, c)

        def heads(z):
            return z.reshape(b, n, self.heads, d).transpose(0, 2, 1, 3).reshape(b * self.heads, n, d)

        q, k, v = heads(self.to_q(h)), heads(self.to_k(h)), heads(self.to_v(h))
        if record is not None:  # per image: heads * Tq * Tk * dim_head MACs for each product
            macs = self.heads * n * n * d
            record(f"{path}/qk", "matmul", macs, 0, ())
            record(f"{path}/av", "matmul", macs, 0, ())
        # 2. scores and fp32 softmax
        q, k = operand_fn(f"{path}/qk", "a", q), operand_fn(f"{path}/qk", "w", k)
        scores = jnp.einsum("bid,bjd->bij", q, k) * (d ** -0.5)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        # 3. weighted values, heads back, output projection, residual
        probs, v = operand_fn(f"{path}/av", "a", probs), operand_fn(f"{path}/av", "w", v)
        out = jnp.einsum("bij,bjd->bid", probs, v)
        out = out.reshape(b, self.heads, n, d).transpose(0, 2, 1, 3).reshape(b, n, self.heads * d)
        out = self.to_out_0(out).reshape(b, hh, ww, c)
        return (out + residual) / self.rescale_output_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; padding 0 pads right/bottom by one first, as diffusers does."""

    channels: int
    padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        pad = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
        return _conv(self.channels, 3, self.dtype, "conv", stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, "conv")(x)


class _Common(nn.Module):
    """Fields shared by the blocks."""

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    time_scale_shift: str
    act_fn: str
    attention: bool = False
    head_dim: int | None = None  # None: one head of full width
    dtype: Any = jnp.float32

    def resnet(self, i: int, **kw) -> ResnetBlock2D:
        return ResnetBlock2D(self.out_channels, self.groups, self.eps, self.time_scale_shift, act_fn=self.act_fn,
                             dtype=self.dtype, name=f"resnets_{i}", **kw)

    def attn(self, i: int, norm_groups: int | None, rescale: float = 1.0) -> SelfAttention2D:
        c = self.out_channels
        d = self.head_dim or c
        return SelfAttention2D(c, c // d, d, norm_groups, self.eps, rescale, dtype=self.dtype, name=f"attentions_{i}")


class DownBlock(_Common):
    """`DownBlock2D` / `AttnDownBlock2D`: (resnet [+ attention]) x num_layers, then an optional downsampler."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        states = ()
        for i in range(self.num_layers):
            x = self.resnet(i)(x, temb)
            if self.attention:
                x = self.attn(i, self.groups)(x)
            states += (x,)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0")(x)
            states += (x,)
        return x, states


class UpBlock(_Common):
    """`UpBlock2D` / `AttnUpBlock2D`: (concat skip, resnet [+ attention]) x num_layers, then an optional upsampler."""

    add_upsample: bool = True
    concatenates_skips = True  # resnet i takes concat([x, skip]): quant.sites splits its shortcut's input ranges

    @nn.compact
    def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = self.resnet(i)(x, temb)
            if self.attention:
                x = self.attn(i, self.groups)(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class MidBlock(_Common):
    """`UNetMidBlock2D`: resnet, [attention], resnet, all scaled by `output_scale_factor`."""

    attn_groups: int | None = None
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        x = self.resnet(0, output_scale_factor=self.output_scale_factor)(x, temb)
        if self.attention:
            x = self.attn(0, self.attn_groups, self.output_scale_factor)(x)
        return self.resnet(1, output_scale_factor=self.output_scale_factor)(x, temb)


class UNet2D(nn.Module):
    """diffusers `UNet2DModel` in Flax: eps/sample prediction from NHWC `x`, timesteps `t` and optional labels.

    `config` is `config_to_static(check_unet2d_config(d))`. Labels are ignored when the model has no class
    embedding (diffusers raises instead; this lets the project's samplers pass labels to every model).
    """

    config: tuple
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: Any, class_labels: jax.Array | None = None) -> jax.Array:
        cfg = check_unet2d_config(dict(self.config))
        bo, lpb, dt = list(cfg["block_out_channels"]), cfg["layers_per_block"], self.dtype
        temb_dim = cfg["time_embedding_dim"] or 4 * bo[0]
        common = dict(groups=cfg["norm_num_groups"], eps=cfg["norm_eps"], act_fn=cfg["act_fn"],
                      time_scale_shift=cfg["resnet_time_scale_shift"], head_dim=cfg["attention_head_dim"], dtype=dt)
        in_dtype = x.dtype
        h = x.astype(dt)
        if cfg["center_input_sample"]:
            h = 2 * h - 1.0
        # 1. time (and class) embedding
        b = h.shape[0]
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(t), (-1,)), (b,))
        if cfg["time_embedding_type"] == "fourier":
            time_proj = GaussianFourierProjection(bo[0], name="time_proj")
        else:
            time_proj = partial(timestep_embedding, dim=bo[0], flip_sin_to_cos=cfg["flip_sin_to_cos"],
                                shift=cfg["freq_shift"])
        emb = TimestepEmbedding(temb_dim, dt, name="time_embedding")(time_proj(t).astype(dt))
        ctype = cfg["class_embed_type"]
        if ctype is not None or cfg["num_class_embeds"] is not None:
            if class_labels is None:
                raise ValueError("class_labels are required: this UNet2DModel has a class embedding "
                                 f"(class_embed_type={ctype!r}, num_class_embeds={cfg['num_class_embeds']})")
            if ctype == "timestep":
                class_emb = TimestepEmbedding(temb_dim, dt, name="class_embedding")(time_proj(class_labels).astype(dt))
            elif ctype == "identity":
                class_emb = class_labels
            else:
                class_emb = nn.Embed(cfg["num_class_embeds"], temb_dim, dtype=dt, name="class_embedding")(
                    class_labels.astype(jnp.int32))
            emb = emb + class_emb.astype(dt)
        # 2. down path, keeping every skip state
        h = _conv(bo[0], 3, dt, "conv_in")(h)
        skips: tuple = (h,)
        for i, kind in enumerate(cfg["down_block_types"]):
            block = DownBlock(bo[i], lpb, attention=kind == "AttnDownBlock2D", add_downsample=i < len(bo) - 1,
                              downsample_padding=cfg["downsample_padding"], name=f"down_blocks_{i}", **common)
            h, states = block(h, emb)
            skips += states
        # 3. mid block
        if cfg["mid_block_type"] is not None:
            ag = cfg["attn_norm_num_groups"]
            if ag is None:  # diffusers: the mid attention has a group norm only with "default" time embedding
                ag = cfg["norm_num_groups"] if cfg["resnet_time_scale_shift"] == "default" else None
            h = MidBlock(bo[-1], 1, attention=cfg["add_attention"], attn_groups=ag,
                         output_scale_factor=cfg["mid_block_scale_factor"], name="mid_block", **common)(h, emb)
        # 4. up path, consuming the skips last-in first-out
        for i, kind in enumerate(cfg["up_block_types"]):
            block = UpBlock(bo[::-1][i], lpb + 1, attention=kind == "AttnUpBlock2D", add_upsample=i < len(bo) - 1,
                            name=f"up_blocks_{i}", **common)
            h = block(h, skips[-(lpb + 1):], emb)
            skips = skips[:-(lpb + 1)]
        # 5. output head
        h = nn.silu(_group_norm(cfg["norm_num_groups"], cfg["norm_eps"], dt, "conv_norm_out")(h))
        h = _conv(cfg["out_channels"], 3, dt, "conv_out")(h)
        if cfg["time_embedding_type"] == "fourier":  # NCSN++ output scaling: divide by sigma
            h = h / t.astype(h.dtype).reshape(b, 1, 1, 1)
        return h.astype(in_dtype)


# --- loading ------------------------------------------------------------------------------------------------------

_OLD_ATTN = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_OLD_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def unet2d_rename(key: str) -> str:
    """Old diffusers attention names -> current ones (as diffusers' `_fix_state_dict_keys_on_load`):
    `query`/`key`/`value`/`proj_attn` -> `to_q`/`to_k`/`to_v`/`to_out.0`; also `time_proj.W` -> `time_proj.weight`."""
    m = _OLD_ATTN.match(key)
    if m:
        return f"{m.group(1)}.{_OLD_NAMES[m.group(2)]}.{m.group(3)}"
    return "time_proj.weight" if key == "time_proj.W" else key


def _spatial(cfg: dict) -> tuple[int, int]:
    s = cfg["sample_size"]
    if s is None:  # any size divisible by the total downsampling works for shapes
        s = 4 * 2 ** (len(cfg["block_out_channels"]) - 1)
    return (s, s) if is_int(s) else (int(s[0]), int(s[1]))


def example_inputs_unet2d(config: dict, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x zeros NHWC at `sample_size`, t zeros int32 (B,), labels zeros (B,) int32; (B, temb) float32 for the
    "identity" class embedding)."""
    cfg = check_unet2d_config(dict(config))
    h, w = _spatial(cfg)
    x = jnp.zeros((batch, h, w, cfg["in_channels"]), jnp.float32)
    if cfg.get("class_embed_type") == "identity":
        labels = jnp.zeros((batch, cfg["time_embedding_dim"] or 4 * cfg["block_out_channels"][0]), jnp.float32)
    else:
        labels = jnp.zeros((batch,), jnp.int32)
    return x, jnp.zeros((batch,), jnp.int32), labels


def read_unet2d_config(folder: str | os.PathLike) -> dict:
    """`folder/config.json`, checked; errors name the file."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise WeightsError(f"UNet2DModel folder {str(folder)!r} does not exist; nothing is downloaded: fetch it "
                           f"first, e.g. `huggingface-cli download <repo>`")
    try:
        raw = read_json(path, "UNet2DModel config")
    except (OSError, ValueError) as e:
        raise WeightsError(f"{e} (a diffusers UNet2DModel folder needs config.json)") from e
    name = raw.get("_class_name")
    if name is not None and name != "UNet2DModel":
        raise WeightsError(f"{str(path)!r} is a {name!r} config, not a UNet2DModel")
    try:
        return check_unet2d_config(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def load_unet2d(folder: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[UNet2D, dict, dict]:
    """A diffusers `UNet2DModel` folder -> (UNet2D module, params, normalised config).

    Params via `pretrained.load_component` (the converted msgpack, else PyTorch weights renamed by
    `unet2d_rename`). Shapes come from `jax.eval_shape` (no init); every name and shape is checked.
    """
    folder = Path(folder)
    cfg = read_unet2d_config(folder)
    module = UNet2D(config_to_static(cfg), dtype=dtype)
    expected = jax.eval_shape(module.init, jax.random.key(0), *example_inputs_unet2d(cfg))["params"]
    params = load_component(folder, expected, rename=unet2d_rename)
    return module, params, cfg
