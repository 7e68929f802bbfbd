"""The embedded default at N = 5 steps (issue 17): 5 quad groups, budget uniform W6A6 at 5 steps.

At few steps the timestep axis matters most: DDIM-quad is a weak seed at N <= 5 (README "Results").
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402


def get_config():
    c = default.get_config()
    c.num_steps = 5
    return c
