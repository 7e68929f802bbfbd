"""`search_benchmark_base.py` with no probes (issue 17; `sensitivity_metric='noise_model'`): the knapsack start on
each site's MACs times the quantization noise power 4^-b alone, the control that says what the measured
sensitivities add to it."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import search_benchmark_base  # noqa: E402


def get_config():
    c = search_benchmark_base.get_config()
    c.sensitivity_metric = "noise_model"
    return c
