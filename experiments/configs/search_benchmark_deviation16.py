"""`search_benchmark_deviation.py` with 16 samples per probe instead of 8 (issue 17): whether less noisy deviation
probes give a better knapsack start (the probes' sampler runs double in the ledger)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import search_benchmark_deviation  # noqa: E402


def get_config():
    c = search_benchmark_deviation.get_config()
    c.sensitivity_samples = 16
    return c
