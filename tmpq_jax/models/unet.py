"""The `conditional` model family: named configurations of diffusers' `FlaxUNet2DConditionModel` and a class-conditional wrapper.

The wrapper takes NHWC images, integer timesteps and integer class labels. Labels are embedded as a single
cross-attention token, so the UNet's cross-attention blocks carry the condition. Label `num_classes` is the
null label (used by models trained without labels).
"""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _silence_diffusers() -> None:
    """diffusers 0.39 prints a deprecation warning at every Flax module setup(); silence it."""
    import diffusers.utils.logging as dlog

    dlog.set_verbosity_error()
    logging.getLogger("diffusers").setLevel(logging.ERROR)


_silence_diffusers()
from diffusers import FlaxUNet2DConditionModel  # noqa: E402

from tmpq_jax.models.registry import ModelFamily, ModelSpec, register_model  # noqa: E402


CONDITIONAL_SPECS: dict[str, ModelSpec] = {
    "mnist-small": ModelSpec(
        name="mnist-small",
        unet=dict(
            sample_size=28,
            in_channels=1,
            out_channels=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=64,
        ),
        image_size=28,
        channels=1,
        num_classes=10,
        description="class-conditional 28x28x1 UNet, attention at 14x14 and in the 7x7 mid block",
    ),
    "mnist-tiny": ModelSpec(
        name="mnist-tiny",
        unet=dict(
            sample_size=28,
            in_channels=1,
            out_channels=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 32),
            layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=32,
        ),
        image_size=28,
        channels=1,
        num_classes=10,
        description="a small class-conditional UNet for tests and quick demos",
    ),
    "cifar-ddpm": ModelSpec(
        name="cifar-ddpm",
        unet=dict(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            attention_head_dim=32,
            cross_attention_dim=256,
        ),
        image_size=32,
        channels=3,
        num_classes=0,
        description="a benchmark stand-in sized like DDPM's CIFAR-10 UNet (128-256-256-256, attention at 16x16); real "
                    "CIFAR-10 weights load through the unet2d family",
    ),
}


class ConditionalUNet(nn.Module):
    """eps_theta(x_t, t, y): a diffusers Flax UNet on NHWC inputs with labels as one cross-attention token."""

    unet_config: tuple[tuple[str, Any], ...]
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        cfg = dict(self.unet_config)
        unet = FlaxUNet2DConditionModel(**cfg, dtype=self.dtype, name="unet")
        if labels is None:
            labels = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
        context = nn.Embed(self.num_classes + 1, cfg["cross_attention_dim"], name="label_embedding")(labels)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
        out = unet(jnp.transpose(x, (0, 3, 1, 2)).astype(self.dtype), t, context[:, None, :].astype(self.dtype),
                   return_dict=False)[0]
        return jnp.transpose(out, (0, 2, 3, 1)).astype(x.dtype)


def build_conditional(spec: ModelSpec, dtype: Any = jnp.float32) -> ConditionalUNet:
    return ConditionalUNet(unet_config=tuple(sorted(spec.unet.items())), num_classes=spec.num_classes, dtype=dtype)


def conditional_inputs(spec: ModelSpec, batch: int = 1):
    return (jnp.zeros((batch, *spec.sample_shape), jnp.float32), jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch,), jnp.int32))


register_model(ModelFamily("conditional", build_conditional, conditional_inputs,
                           doc="the project's class-conditional diffusers Flax UNets (labels as one context token)"),
               CONDITIONAL_SPECS)
