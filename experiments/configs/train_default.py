"""Train the default `mnist-small` UNet on the 4500 embedded MNIST training digits."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "mnist-small"
    c.dataset = "mnist"
    c.dataset_path = ""
    c.seed = 0
    c.batch_size = 128
    c.num_steps = 20000
    c.learning_rate = 5e-4
    c.warmup_steps = 500
    c.weight_decay = 0.0
    c.grad_clip = 1.0
    c.ema_decay = 0.999
    c.checkpoint_every = 1000
    c.sample_grid = True
    c.sample_steps = 100
    return c
