"""TMPQ-DM's CIFAR-10 setting on diffusers' `google/ddpm-cifar10-32` (the EMA UNet2DModel), for a GPU or TPU.

Reference settings: DDIM (eta 0) with N = 10 quad groups, bits {8,7,6,5}, W6A6 budget, population 50, 20 generations,
top-10 parents, 25 mutations, 10 crossovers, mutation probability 0.25, Inception FID on 2000 samples against the
CIFAR-10 training statistics. Reports use other noise and the CIFAR-10 *test* statistics (DESIGN.md Sec. 5).

    python experiments/fid.py stats --images PATH/cifar-10-batches-py --split train --out cifar10_train_stats.npz
    python experiments/fid.py stats --images PATH/cifar-10-batches-py --split test --out cifar10_test_stats.npz
    python experiments/search.py --config experiments/configs/cifar10.py \
        --config.model_dir=PATH/ddpm-cifar10-32 --workdir runs/cifar10
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper  # noqa: E402


def get_config():
    c = paper.get_config()  # population 50, 20 generations, top-10, 25 mutations, 10 crossovers, m_prob 0.25,
    #                         2000 search samples, top-10 re-scored on 5000, reports on 10000
    # model: a downloaded diffusers folder (schedule from its scheduler_config.json)
    c.model = "unet2d"
    c.model_dir = ""  # required: --config.model_dir=PATH/ddpm-cifar10-32
    c.checkpoint = ""
    # space and budget (N = 10 quad groups, bits {8,7,6,5}, W6A6)
    c.num_steps = 10
    c.spacing = "quad"
    c.bit_choices = (8, 7, 6, 5)
    c.budget_bits = 6
    # fitness: Inception FID vs the CIFAR-10 training statistics; reports: the test statistics
    c.metric = "inception_fid"
    c.fitness_reference = "cifar10_train_stats.npz"
    c.report_metrics = ("inception_fid",)
    c.report_reference = "cifar10_test_stats.npz"
    c.fid_batch = 500
    c.calib_batch = 256
    c.sample_batch = 500
    return c
