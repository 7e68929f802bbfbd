"""A seconds-scale run of the whole pipeline, for tests."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402


def get_config():
    c = default.get_config()
    c.num_steps = 3
    c.population_size = 4
    c.generations = 2
    c.num_parents = 2
    c.num_mutation = 1
    c.num_crossover = 1
    c.search_samples = 8
    c.select_samples = 8  # equal batch shapes: one compiled sampler serves fitness, selection and reports
    c.final_samples = 8
    c.rescore_top_k = 2
    c.pareto_generations = 1
    c.sensitivity_samples = 8  # the fitness samples
    c.sensitivity_mac_share = 0.3  # 8 probes
    c.dp_per_group = 3
    c.dp_samples = 8
    c.reference_steps = 4
    c.calib_steps = 4
    c.calib_samples = 8
    c.reconstruct = True  # every calibration technique on, reconstruction only a few steps per block
    c.recon_samples = 24
    c.recon_iters = 3
    c.recon_batch = 4
    c.fid_batch = 8  # one Inception batch per final image set
    return c
