"""The base config of `experiments/search_benchmark.py` (issue 17): the embedded default as every committed benchmark
row was run, pinned here so that later changes of the default's search settings do not change what new rows of the
same benchmark measure. The benchmark sets the algorithm, steps, seeds and runs of each row itself."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402


def get_config():
    c = default.get_config()
    c.algorithm = "evolution"
    c.select_metric = ""  # the fitness's; --select_metric sets another
    c.sensitivity_samples = 8
    c.sensitivity_mac_share = 0.9
    c.sensitivity_metric = "fitness"
    c.sample_batch = 16
    c.generations = 6
    c.pareto_generations = 2
    c.rescore_top_k = 3
    c.baselines = ("uniform_w8a8", "uniform_w6a6", "timestep_only", "precision_only", "greedy_bits")
    return c
