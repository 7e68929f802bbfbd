"""One front for every budget (issue 17): budgets from the config, and the best evaluated candidate at each.

A run searches several BitOPs budgets and shares its evaluations: every candidate scored for one budget also counts
for every larger budget it fits. `budget_limits` turns `config.budgets` into exact integer limits; `best_per_budget`
picks, from a pool of scored candidates, the top distinct ones that fit each limit; `front_flags` marks which of
the chosen points are on the non-dominated (BitOPs, score) front (`operators.pareto_front`).
"""

from __future__ import annotations

import numpy as np

from tmpq_jax.search.operators import pareto_front

MAX_FRACTION = 4.0  # config.budgets entries up to this are fractions of the default budget; above, BitOPs


def entry_limit(b, default_limit: int) -> int:
    """BitOPs of one config.budgets entry: a fraction of `default_limit` in (0, MAX_FRACTION], or a whole BitOPs
    count above MAX_FRACTION; anything else is an error naming the value and the valid forms."""
    valid = (f"valid: fractions of the default budget in (0, {MAX_FRACTION:g}] or whole BitOPs counts > "
             f"{MAX_FRACTION:g}")
    if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)) or not np.isfinite(b):
        raise ValueError(f"config.budgets has {b!r}; {valid}")
    if 0 < b <= MAX_FRACTION:
        return int(round(float(b) * default_limit))
    if b > MAX_FRACTION and float(b) == int(b):
        return int(b)
    raise ValueError(f"config.budgets has {b!r}; {valid}")


def budget_limits(budgets, default_limit: int, cheapest: int, most: int) -> list[int]:
    """Exact BitOPs limits of `budgets` (`entry_limit`), ascending, duplicates removed, with `default_limit` always
    included. Every limit must lie in [cheapest, most] (the all-lowest and the all-highest candidate)."""
    out = {int(default_limit)}
    for b in budgets:
        limit = entry_limit(b, default_limit)
        if not cheapest <= limit <= most:
            raise ValueError(f"config.budgets entry {b!r} is {limit:,} BitOPs; valid: [{cheapest:,}, {most:,}] "
                             f"(fractions [{cheapest / default_limit:.3f}, {most / default_limit:.3f}] of the "
                             f"default budget {default_limit:,})")
        out.add(limit)
    return sorted(out)


def best_per_budget(costs, scores, limits, k: int) -> list[np.ndarray]:
    """For each limit, the indices of the k lowest finite scores among the pool's candidates costing <= limit
    (best first; ties by pool order). `costs` int (P,), `scores` (P,) with NaN/inf as infeasible."""
    costs = np.asarray(costs, np.int64)
    scores = np.asarray(scores, np.float64)
    ok = np.isfinite(scores)
    order = np.lexsort((np.arange(len(scores)), np.where(ok, scores, np.inf)))
    out = []
    for limit in limits:
        fits = order[(costs[order] <= limit) & ok[order]]
        out.append(fits[:k].astype(np.int64))
    return out


def front_flags(costs, scores) -> np.ndarray:
    """bool (P,): the points on the non-dominated front of (cost, score), both minimised."""
    flags = np.zeros(len(costs), bool)
    flags[pareto_front(costs, scores)] = True
    return flags
