"""A tiny random diffusers `UNet2DModel` folder, saved the way diffusers saves one (the path a downloaded
google/ddpm-cifar10-32 takes)."""

TINY_UNET2D = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   norm_num_groups=4, attention_head_dim=8)


def save_unet2d_folder(path, pipeline_layout=False, **overrides):
    """A random UNet2DModel and a DDPM scheduler config, saved as diffusers saves them (safetensors)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(**{**TINY_UNET2D, **overrides})
    with torch.no_grad():  # no zero-initialised tensors, so every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet_dir, sched_dir = (path / "unet", path / "scheduler") if pipeline_layout else (path, path)
    model.save_pretrained(unet_dir)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True).save_pretrained(sched_dir)
    return model
