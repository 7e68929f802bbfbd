"""A few steps of the default training, for tests."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_default  # noqa: E402


def get_config():
    c = train_default.get_config()
    c.model = "mnist-tiny"
    c.batch_size = 8
    c.num_steps = 6
    c.warmup_steps = 2
    c.checkpoint_every = 2
    c.sample_grid = False
    return c
