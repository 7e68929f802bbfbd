"""Local variation operators and the Pareto front (no model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.search import operators as ops
from tmpq_jax.search.budget import Budget
from tmpq_jax.search.space import Genome, SearchSpace

SPACE = SearchSpace.create(num_steps=10, num_sites=40)


def changed(a: Genome, b: Genome) -> int:
    return int(sum(np.sum(np.asarray(x) != np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


@pytest.mark.parametrize("expected", [1.0, 2.0, 4.0])
def test_mutate_local_changes_the_expected_number_of_genes_by_local_moves(expected):
    g = SPACE.random(jax.random.key(0))
    mutants = jax.vmap(lambda k: ops.mutate_local(k, g, SPACE, expected))(jax.random.split(jax.random.key(1), 4000))
    counts = [changed(g, jax.tree.map(lambda x: x[i], mutants)) for i in range(4000)]
    # Binomial(90, expected / 90): the mean of 4000 draws is within 4 standard errors
    se = np.sqrt(expected * (1 - expected / 90) / 4000)
    assert abs(np.mean(counts) - expected) < 4 * se
    for name in ("w_bit_idx", "a_bit_idx"):
        step = np.abs(np.asarray(getattr(mutants, name)) - np.asarray(getattr(g, name))[None])
        assert set(np.unique(step)) <= {0, 1}  # ordinal +-1 moves only
    for i in range(0, 4000, 97):
        SPACE.validate(jax.tree.map(lambda x: x[i], mutants))


def test_mutate_local_keeps_the_ends_inside_and_frozen_axes_frozen():
    top = SPACE.uniform_bits(8)
    bottom = SPACE.uniform_bits(5)
    for g, want in ((top, 1), (bottom, 2)):  # from index 0 only +1, from index 3 only -1
        m = ops.mutate_local(jax.random.key(3), g, SPACE, 60.0)
        moved = np.asarray(m.w_bit_idx) != np.asarray(g.w_bit_idx)
        assert moved.any() and np.all(np.asarray(m.w_bit_idx)[moved] == want)
    t_only = SPACE.restrict(search_bits=False)
    m = ops.mutate_local(jax.random.key(4), t_only.seed(), t_only, 5.0)
    assert np.array_equal(m.w_bit_idx, t_only.seed().w_bit_idx) and changed(m, t_only.seed()) > 0


def test_block_crossover_takes_whole_blocks():
    paths = [f"unet/down_blocks_{i // 4}/resnets_0/conv{i % 4}" for i in range(40)]
    blocks = ops.block_ids(paths)
    assert blocks.tolist() == [i // 4 for i in range(40)]
    g1, g2 = SPACE.uniform_bits(8), SPACE.uniform_bits(5)
    seen = set()
    for k in range(20):
        c = ops.block_crossover(jax.random.key(k), g1, g2, blocks)
        w = np.asarray(c.w_bit_idx).reshape(10, 4)
        assert np.all(w == w[:, :1]) and np.array_equal(c.w_bit_idx, c.a_bit_idx)
        seen.add(tuple(w[:, 0].tolist()))
    assert len(seen) > 10  # blocks are drawn independently


def test_swap_raises_one_operand_and_stays_within_budget():
    space = SearchSpace.create(num_steps=4, num_sites=6)
    macs = (10, 20, 30, 40, 50, 60)
    b = Budget(0, macs, (0,) * 6, (0,) * 6, space.bit_choices, 4)
    b = Budget(b.cost_of(space.uniform_bits(6)), macs, (0,) * 6, (0,) * 6, space.bit_choices, 4)
    g = jax.tree.map(np.asarray, space.uniform_bits(6))
    damage = np.tile(np.array([0.0, 1.0, 2.0, 4.0]), (6, 1))
    damage[0] = [0.0, 0.01, 0.02, 0.04]  # site 0 is cheap to lower
    rng = np.random.default_rng(0)
    for _ in range(30):
        s = ops.swap(rng, g, b, damage, damage)
        assert b.cost_of(s) <= b.limit
        assert changed(g, s) >= 2  # one raised, at least one lowered to pay for it (the budget was full)
        raised = np.concatenate([s.w_bit_idx, s.a_bit_idx]) < np.concatenate([g.w_bit_idx, g.a_bit_idx])
        assert raised.sum() == 1


def test_pareto_front_is_the_non_dominated_set():
    rng = np.random.default_rng(0)
    costs = rng.integers(0, 20, 60)
    scores = rng.random(60)
    scores[5] = np.nan
    front = ops.pareto_front(costs, scores)
    finite = ~np.isnan(scores)
    for i in range(60):
        dominated = np.any(finite & (costs <= costs[i]) & (scores <= scores[i]) &
                           ((costs < costs[i]) | (scores < scores[i])))
        assert (i in front) == (finite[i] and not dominated and i == np.flatnonzero(
            (costs == costs[i]) & (scores == scores[i]))[0])
    assert np.all(np.diff(costs[front]) > 0) and np.all(np.diff(scores[front]) < 0)
