"""The front's pieces without a model: budget entries, best per budget, non-dominance."""

import numpy as np
import pytest

from tmpq_jax.search import pareto

DEFAULT = 1_000_000


@pytest.mark.parametrize("entries, want", [
    ((), [DEFAULT]),
    ((0.5, 0.75, 1.0), [500_000, 750_000, DEFAULT]),
    ((1.0, 0.5, 0.5), [500_000, DEFAULT]),  # duplicates removed, ascending
    ((2.0, 600_000), [600_000, DEFAULT, 2_000_000]),  # a fraction and a BitOPs count
    ((0.3333333,), [333_333, DEFAULT]),  # rounded to whole BitOPs
])
def test_budget_limits(entries, want):
    assert pareto.budget_limits(entries, DEFAULT, 100_000, 4_000_000) == want


@pytest.mark.parametrize("entries, match", [
    ((0.0,), r"config.budgets has 0.0; valid: fractions of the default budget in \(0, 4\]"),
    ((-0.5,), r"has -0.5; valid"),
    ((12.5,), r"has 12.5; valid: .* or whole BitOPs counts > 4"),
    ((float("nan"),), r"has nan"),
    (("half",), r"has 'half'"),
    ((True,), r"has True"),
    ((0.05,), r"entry 0.05 is 50,000 BitOPs; valid: \[100,000, 4,000,000\] \(fractions \[0.100, 4.000\]"),
    ((5_000_000,), r"entry 5000000 is 5,000,000 BitOPs; valid: \[100,000, 4,000,000\]"),
])
def test_bad_budget_entries_are_named(entries, match):
    with pytest.raises(ValueError, match=match):
        pareto.budget_limits(entries, DEFAULT, 100_000, 4_000_000)


def test_best_per_budget_is_the_brute_force_choice():
    rng = np.random.default_rng(3)
    costs = rng.integers(0, 100, 200)
    scores = rng.random(200)
    scores[rng.choice(200, 20, replace=False)] = np.inf
    scores[7] = np.nan
    limits = [10, 40, 99, 5]
    picks = pareto.best_per_budget(costs, scores, limits, 3)
    for limit, idx in zip(limits, picks):
        ok = np.flatnonzero((costs <= limit) & np.isfinite(scores))
        want = ok[np.argsort(scores[ok], kind="stable")][:3]
        np.testing.assert_array_equal(idx, want)
        assert np.all(costs[idx] <= limit) and np.all(np.diff(scores[idx]) >= 0)
    # nested budgets: the best at a larger budget is never worse than at a smaller one
    best = [scores[i[0]] for i in picks[:3]]
    assert best[0] >= best[1] >= best[2]
    assert len(pareto.best_per_budget(costs, scores, [-1], 3)[0]) == 0  # nothing fits


def test_front_flags_mark_exactly_the_non_dominated_points():
    costs = np.array([10, 20, 30, 40, 40])
    scores = np.array([5.0, 6.0, 3.0, 3.0, 1.0])  # 20 is dominated by 10; 40/3.0 by 40/1.0 and by 30/3.0
    np.testing.assert_array_equal(pareto.front_flags(costs, scores), [True, False, True, False, True])
