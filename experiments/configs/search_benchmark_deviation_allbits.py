"""`search_benchmark_deviation.py` with every lower bit choice probed (5, 6 and 7 bits; issue 17): the knapsack's
damage at 6 and 7 bits measured instead of interpolated from the 5-bit probe by the 4^-b noise model. Three times the
probes of the default (123 runs' worth at 8 samples, N = 10), still within the benchmark's 150 runs."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import search_benchmark_deviation  # noqa: E402


def get_config():
    c = search_benchmark_deviation.get_config()
    c.sensitivity_probe_bits = (5, 6, 7)
    return c
