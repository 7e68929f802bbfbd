"""`search_benchmark_onestep.py` with every lower bit choice probed (5, 6 and 7 bits): measures how the one-step
damage scales with bits (`experiments/sensitivity_noise.py --agreement_only`, its `bit_scaling`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import search_benchmark_onestep  # noqa: E402


def get_config():
    c = search_benchmark_onestep.get_config()
    c.sensitivity_probe_bits = (5, 6, 7)
    return c
