"""The exact multiple-choice knapsack (no model: synthetic costs and damages)."""

import itertools

import numpy as np
import pytest

from tmpq_jax.search import knapsack
from tmpq_jax.search.budget import Budget
from tmpq_jax.search.space import SearchSpace


def brute_force(costs, damage, limit):
    best = (np.inf, None)
    for choice in itertools.product(*(range(costs.shape[1]) for _ in range(costs.shape[0]))):
        c = sum(costs[i, k] for i, k in enumerate(choice))
        d = sum(damage[i, k] for i, k in enumerate(choice))
        if c <= limit and d < best[0]:
            best = (d, choice)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_solve_equals_brute_force_on_small_instances(seed):
    rng = np.random.default_rng(seed)
    L, K = 5, 4
    costs = rng.integers(1, 60, (L, K)) * 7  # gcd 7: the program runs in exact units
    damage = rng.random((L, K))
    limit = int(costs.min(1).sum() + rng.integers(0, np.ptp(costs, 1).sum() + 1))
    sol = knapsack.solve(costs, damage, limit)
    want, _ = brute_force(costs, damage, limit)
    assert sol.exact_program
    assert sol.cost <= limit and sol.cost == costs[np.arange(L), sol.choice].sum()
    assert sol.damage == pytest.approx(want, abs=1e-12)
    assert sol.lower_bound <= want + 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_bucketed_solutions_are_feasible_in_exact_bitops_and_filled(seed):
    rng = np.random.default_rng(100 + seed)
    L, K = 6, 5
    costs = rng.integers(10**9, 10**10, (L, K))  # huge, coprime-ish costs: buckets of ~limit / 64
    damage = -np.log(costs / costs.max())  # cheaper options do more damage
    limit = int(costs.min(1).sum() + 0.5 * np.ptp(costs, 1).sum())
    sol = knapsack.solve(costs, damage, limit, max_buckets=64)
    want, _ = brute_force(costs, damage, limit)
    assert not sol.exact_program
    assert sol.cost <= limit
    assert sol.damage >= want - 1e-12  # never better than the optimum ...
    assert sol.lower_bound <= want + 1e-12
    # ... and the final fill left no single-site move that lowers the damage within the slack
    rows = np.arange(L)
    slack = limit - sol.cost
    for i in range(L):
        for k in range(K):
            if costs[i, k] - costs[i, sol.choice[i]] <= slack:
                assert damage[i, k] >= damage[i, sol.choice[i]] - 1e-12
    assert sol.damage == pytest.approx(damage[rows, sol.choice].sum())


def test_fill_spends_unused_budget():
    costs = np.array([[1, 4], [1, 4]])
    damage = np.array([[1.0, 0.0], [2.0, 0.0]])
    assert knapsack.fill(costs, damage, 5, np.array([0, 0])).tolist() == [0, 1]  # the larger gain first
    assert knapsack.fill(costs, damage, 8, np.array([0, 0])).tolist() == [1, 1]
    assert knapsack.fill(costs, damage, 4, np.array([0, 0])).tolist() == [0, 0]


@pytest.mark.parametrize("costs,damage,limit,match", [
    (np.array([[5, 6]]), np.array([[0.0, 1.0]]), 4, "cheapest options cost 5"),
    (np.array([[5, 6]]), np.array([[0.0, np.nan]]), 9, "finite"),
    (np.array([[5.0, 6.0]]), np.array([[0.0, 1.0]]), 9, "integers"),
    (np.array([[5, 6]]), np.array([[0.0, 1.0]]), 9.5, "integer number"),
    (np.array([[5, 6]]), np.array([[0.0, 1.0, 2.0]]), 9, "both"),
])
def test_bad_input_is_refused(costs, damage, limit, match):
    with pytest.raises(ValueError, match=match):
        knapsack.solve(costs, damage, limit)


def test_knapsack_genomes_fill_a_budget_and_follow_the_damage():
    space = SearchSpace.create(num_steps=4, bit_choices=(8, 6), num_sites=4)
    macs = (100, 200, 300, 400)
    budget = Budget(0, macs, (0, 0, 0, 8), (0, 0, 0, 0), (8, 6), 4)
    limit = budget.cost_of(space.uniform_bits(6)) + 4 * 400 * (64 - 48)  # W6A6 with room for one site at W8A8
    budget = Budget(limit, *dataclass_rest(budget))
    w_damage = np.array([[0, 1.0], [0, 0.1], [0, 0.1], [0, 5.0]])  # site 3's weights are pinned: no damage counts
    a_damage = np.array([[0, 0.1], [0, 0.1], [0, 9.0], [0, 0.1]])
    genomes, sols = knapsack.knapsack_genomes(budget, space, w_damage, a_damage, weights=(0.5,))
    g, sol = genomes[0], sols[0]
    assert budget.cost_of(g) == sol.cost <= limit
    assert g.a_bit_idx[2] == 0  # site 2's activations hurt most: kept at 8 bits
    assert np.array_equal(g.timestep_idx, np.asarray(space.seed().timestep_idx))
    w_idx, a_idx, costs = knapsack.site_options(budget)
    assert costs.shape == (4, 4) and costs[3, 0] == costs[3, 2]  # pinned weights: w index changes nothing
    want, _ = brute_force(costs, knapsack.additive_damage(w_damage, a_damage, w_idx, a_idx, budget), limit)
    assert sol.exact_program and sol.damage == pytest.approx(want)


def dataclass_rest(b: Budget):
    return b.macs, b.fixed_w, b.fixed_a, b.bit_choices, b.num_steps
