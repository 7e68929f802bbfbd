"""A tiny Stable-Diffusion-shaped pipeline folder built with diffusers' PyTorch classes (random weights).

The UNet uses 32-channel multiples because diffusers' Flax UNet blocks hard-code GroupNorm(32); the VAE takes
`norm_num_groups` from its config, so it stays smaller. No text encoder: tests fill the prompt tables themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=4, norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
    norm_num_groups=4, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)
NOISE = 0.05  # added to every parameter so that zero-initialised ones (e.g. biases) are exercised


def save_tiny_sd(path, prediction_type: str = "epsilon", unet_overrides: dict | None = None) -> dict:
    """Write `path/{model_index.json, unet/, vae/, scheduler/}` like a StableDiffusionPipeline folder (safetensors
    weights); returns {'unet', 'vae', 'scheduler'} (the torch modules, in eval mode, and the scheduler)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    path = Path(path)
    torch.manual_seed(0)
    # 1. models with random weights, every parameter perturbed
    unet = UNet2DConditionModel(**{**UNET_CONFIG, **(unet_overrides or {})})
    vae = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():
        for module in (unet, vae):
            for p in module.parameters():
                p.add_(NOISE * torch.randn_like(p))
            module.eval()
    # 2. the scheduler of SD 1.x (scaled-linear betas, steps_offset 1)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    # 3. the folder
    unet.save_pretrained(path / "unet", safe_serialization=True)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    scheduler.save_pretrained(path / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": [None, None], "tokenizer": [None, None],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"unet": unet, "vae": vae, "scheduler": scheduler}
