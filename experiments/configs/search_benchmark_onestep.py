"""`search_benchmark_base.py` with the sensitivities scored by each probe's one-step error from the FP run's states
(issue 17; `sensitivity_metric='one_step'`): the error a site's quantization adds to one sampling step, which does not
compound along the trajectory the way a whole run's deviation does."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import search_benchmark_base  # noqa: E402


def get_config():
    c = search_benchmark_base.get_config()
    c.sensitivity_metric = "one_step"
    return c
