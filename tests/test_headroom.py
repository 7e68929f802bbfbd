"""experiments/headroom.py's panel (issue 17, what limits the search): no model, a synthetic space."""

import sys
from pathlib import Path

import numpy as np
import pytest

from tmpq_jax.search.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import headroom  # noqa: E402

SPACE = SearchSpace.create(num_steps=3, num_sites=2)  # quad groups [0, 200), [200, 800), [800, 1000)


def test_a_schedule_must_take_one_step_from_each_group():
    assert SPACE.starts == (0, 200, 800)
    assert headroom.check_schedule(SPACE, [999, 250, 0]).tolist() == [0, 50, 199]
    for bad, why in (([999, 850, 0], r"timestep 850 is outside its group 1: \[200, 799\]"),
                     ([799, 250, 0], r"timestep 799 is outside its group 2: \[800, 999\]"),
                     ([999, 250], r"2 timesteps for N=3 groups"),
                     ([1000, 250, 0], r"timestep 1000 is outside its group 2: \[800, 999\]")):
        with pytest.raises(ValueError, match=why):
            headroom.check_schedule(SPACE, bad)


def test_panel_decomposes_each_winner_and_keeps_one_row_per_candidate():
    g5, g6 = (np.array([8, 5]), np.array([8, 5])), (np.array([8, 5]), np.array([8, 6]))
    variants = {"a5": g5, "a6": g6}
    quad = [800, 200, 0]
    visited = [("w1", {"timesteps": [900, 200, 0], "w_bits": [7, 7], "a_bits": [6, 6]}),
               ("same_as_greedy", {"timesteps": quad, "w_bits": [8, 5], "a_bits": [8, 6]})]
    rows = headroom.panel(SPACE, variants, visited, "a6", ["900 200 0"])
    names = [r["name"] for r in rows]
    # the winner's schedule is one of --schedules: its 'a6@w1 schedule' row is the same candidate as 'a6@900 200 0'
    assert names == ["fp@quad", "a5@quad", "a6@quad", "fp@900 200 0", "a5@900 200 0", "a6@900 200 0", "w1",
                     "w1 bits@quad"]
    by = {r["name"]: r for r in rows}
    assert np.asarray(by["w1 bits@quad"]["timesteps"]).tolist() == quad
    assert np.asarray(by["w1 bits@quad"]["w_bits"]).tolist() == [7, 7]
    assert by["fp@quad"]["fp"] and "w_bits" not in by["fp@quad"]


def test_sharpness_is_the_mean_squared_laplacian_and_blur_lowers_it():
    x = np.zeros((1, 5, 5, 1))
    x[0, 2, 2, 0] = 1.0  # one bright pixel: Laplacian 4 at it, -1 at its 4 neighbours, 0 elsewhere in the 3x3 interior
    assert headroom.sharpness(x) == pytest.approx((16 + 4 * 1) / 9)
    rng = np.random.default_rng(0)
    img = rng.uniform(-1, 1, (4, 12, 12, 1))
    blurred = (img + np.roll(img, 1, 1) + np.roll(img, -1, 1) + np.roll(img, 1, 2) + np.roll(img, -1, 2)) / 5
    assert headroom.sharpness(blurred) < 0.3 * headroom.sharpness(img)


def test_greedy_budget_rows_are_greedy_bits_under_each_scaled_budget():
    from tmpq_jax import quant
    from tmpq_jax.search.budget import Budget

    sites = quant.SiteTable(tuple(quant.Site(n, "conv", m, 1, 0, 0) for n, m in (("a", 10), ("b", 20), ("c", 70))))
    space = SearchSpace.create(num_steps=2, num_sites=3, bit_choices=(8, 6), seed_bits=6)
    budget = Budget.create(sites, space)  # W6A6: 100 * 36 * 2 steps = 7200
    quad = [800, 0]
    rows = headroom.greedy_budget_rows(space, budget, quad, [1.0, 1.5])
    # activations from 6 (the lowest choice) or from 8; from 8 does not fit 1x (W6A8 = 9600 BitOPs): left out
    assert [r["name"] for r in rows] == ["greedy_bits(a from 6)@quad, 1x budget",
                                         "greedy_bits(a from 6)@quad, 1.5x budget",
                                         "greedy_bits(a from 8)@quad, 1.5x budget"]
    # 1x: all at W6A6 fits, raising any site to W8A8 does not; 1.5x (10,800): a and b fit at W8A8 (64 * 30 + 36 *
    # 70 = 4440 per step = 8880), c too would cost 12,800; from A8 (W6A8 = 9600): a and b raise to W8 (10,560)
    assert [np.asarray(r["w_bits"]).tolist() for r in rows] == [[6, 6, 6], [8, 8, 6], [8, 8, 6]]
    assert [np.asarray(r["a_bits"]).tolist() for r in rows] == [[6, 6, 6], [8, 8, 6], [8, 8, 8]]
    assert all(r["timesteps"] == quad for r in rows)
    for bad in (0.5, 2.0):  # outside [all-lowest, all-highest] = [1, 64/36]
        with pytest.raises(ValueError, match=rf"entry {bad} is .* BitOPs; valid: .*fractions \[1.000, 1.778\]"):
            headroom.greedy_budget_rows(space, budget, quad, [bad])
    with pytest.raises(ValueError, match=r"has nan; valid: fractions"):
        headroom.greedy_budget_rows(space, budget, quad, [float("nan")])
