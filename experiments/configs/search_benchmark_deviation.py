"""`search_benchmark_base.py` with the sensitivities scored by deviation from the all-top images (issue 17): the
knapsack start and the local search of `experiments/search_benchmark.py` on probes that measure each site's own
effect instead of a change of the fitness."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import search_benchmark_base  # noqa: E402


def get_config():
    c = search_benchmark_base.get_config()
    c.sensitivity_metric = "deviation"
    return c
