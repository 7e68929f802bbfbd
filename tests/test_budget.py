"""Exact integer BitOPs budgets: cost, feasibility, repair within a space, and the greedy_bits baseline."""

import jax
import numpy as np
import pytest

from tmpq_jax import quant
from tmpq_jax.search import Budget, SearchSpace

SPACE = SearchSpace.create(10, 7)
# large MACs: float32 could not represent these costs exactly
MACS = [1000, 10, 10, 500, 10, 10, 10]
BIG = [m * 1_000_003_001 for m in MACS]


def sites_with_macs(macs, fixed_a=()):
    return quant.SiteTable(tuple(quant.Site(f"site{i}", "conv", int(m), 1, 0, 8 if i in fixed_a else 0)
                                 for i, m in enumerate(macs)))


def population(n, seed=3, all_w8=True):
    pop = jax.tree.map(np.asarray, jax.vmap(SPACE.random)(jax.random.split(jax.random.key(seed), n)))
    return pop.replace(w_bit_idx=np.zeros_like(pop.w_bit_idx)) if all_w8 else pop


@pytest.mark.parametrize("macs", [MACS, BIG], ids=["small", "beyond-float32"])
def test_uniform_w6a6_costs_exactly_its_budget(macs):
    sites = sites_with_macs(macs)
    b = Budget.create(sites, SPACE)
    assert isinstance(b.limit, int) and b.limit == sum(macs) * 36 * 10
    assert b.cost_of(SPACE.uniform_bits(6)) == b.limit and bool(b.is_feasible(SPACE.uniform_bits(6)))
    assert not bool(b.is_feasible(SPACE.uniform_bits(7)))
    # one bit more on the smallest site is over budget by exactly its cost difference
    g = SPACE.uniform_bits(6)
    g = g.replace(w_bit_idx=np.asarray(g.w_bit_idx).copy())
    g.w_bit_idx[1] = 1  # 7 bits
    assert b.cost_of(g) - b.limit == macs[1] * 6 * 10


def test_repair_never_exceeds_budget_and_lowers_costliest_first():
    b = Budget.create(sites_with_macs(MACS), SPACE)
    fixed, cost, ok = b.repair(population(300), SPACE)
    assert ok.all() and cost.max() <= b.limit and cost.dtype == np.int64
    np.testing.assert_array_equal(cost, b.cost_of(fixed))
    g, _, ok = b.repair(jax.tree.map(lambda x: np.asarray(x)[None], SPACE.uniform_bits(8)), SPACE)
    assert ok[0] and g.w_bit_idx[0, 0] > 0 and g.w_bit_idx[0, 1] == 0  # the big site paid first
    tight = Budget(b.cost_of(SPACE.uniform_bits(5)), b.macs, b.fixed_w, b.fixed_a, b.bit_choices, b.num_steps)
    g, _, ok = tight.repair(jax.tree.map(lambda x: np.asarray(x)[None], SPACE.uniform_bits(8)), SPACE)
    assert ok[0] and g.w_bit_idx.min() == 3 and g.a_bit_idx.min() == 3


def test_pinned_sites_are_never_changed_and_impossible_stays_infeasible():
    b = Budget.create(sites_with_macs(MACS, fixed_a=(0,)), SPACE)
    over = Budget(b.cost_of(SPACE.uniform_bits(5)) - 1, b.macs, b.fixed_w, b.fixed_a, b.bit_choices, b.num_steps)
    g, cost, ok = over.repair(population(20), SPACE)
    assert not ok.any() and (cost > over.limit).all()
    assert (g.w_bit_idx == 3).all() and (g.a_bit_idx[:, 1:] == 3).all()  # everything searchable went down
    assert cost[0] == over.cost(np.full(7, 5), np.r_[8, np.full(6, 5)])  # site 0's activations stay at 8


def test_single_axis_repair_stays_in_its_space():
    b = Budget.create(sites_with_macs(MACS), SPACE)
    pop = population(50)
    t_only = SPACE.restrict(search_bits=False)
    g, cost, ok = b.repair(pop, t_only)
    np.testing.assert_array_equal(g.w_bit_idx, pop.w_bit_idx)  # bits untouched, so all-8-bit weights are over
    np.testing.assert_array_equal(g.a_bit_idx, pop.a_bit_idx)
    assert not ok.any()
    p_only = SPACE.restrict(search_timesteps=False)
    g, cost, ok = b.repair(pop, p_only)
    np.testing.assert_array_equal(g.timestep_idx, pop.timestep_idx)
    assert ok.all()


def test_budget_below_the_cheapest_candidate_is_an_error():
    with pytest.raises(ValueError, match=r"budget 10 BitOPs is impossible: the cheapest candidate \(all 5-bit"):
        Budget.create(sites_with_macs(MACS), SPACE, limit=10)
    with pytest.raises(ValueError, match="non-negative integer"):
        Budget.create(sites_with_macs(MACS), SPACE, limit=2.5e9 + 0.5)


def test_greedy_bits_raises_smallest_sites_first():
    b = Budget.create(sites_with_macs([1000, 10, 20, 500, 30, 40, 50]), SPACE)
    g = b.greedy_bits(SPACE)
    w, a = b.bits_of(g)
    assert b.is_feasible(g) and (np.asarray(g.timestep_idx) == 0).all()
    # raised sites (8 bits) are the smallest ones; the rest at 5 bits
    np.testing.assert_array_equal(w, a)
    raised = np.flatnonzero(w == 8)
    assert set(w.tolist()) == {8, 5} and set(raised.tolist()) == {1, 2, 4, 5, 6}
    g6 = b.greedy_bits(SPACE, a_start=6)
    w6, a6 = b.bits_of(g6)
    assert b.is_feasible(g6) and set(a6[w6 == 5].tolist()) == {6}
    # no site that was left low could still be raised within the budget
    for s in np.flatnonzero(w6 == 5):
        ww, aa = w6.copy(), a6.copy()
        ww[s] = aa[s] = 8
        assert b.cost(ww, aa) > b.limit
