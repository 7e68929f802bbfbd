"""The multiple-choice knapsack of per-site bit-widths under an exact BitOPs budget.

Each site picks one option (a (w, a) pair of bit indices); options have an exact integer cost (MACs x w x a x N,
`Budget.site_costs`) and an additive damage (per-site sensitivities). `solve` minimises the summed damage with the
summed cost <= limit:

1. a dynamic program over cost buckets. Costs are counted in units of their greatest common divisor when the budget
   spans at most `max_buckets` of them (then the program is exact); otherwise in buckets of ceil(limit /
   max_buckets) BitOPs with every cost rounded *up*, so each solution it returns is feasible in exact BitOPs;
2. an exact final fill: while a single site can move to an option that lowers the damage within the exact slack
   left, the best such move is made. This spends budget that bucket rounding left unused;
3. a Lagrangian lower bound, max over lambda >= 0 of sum_i min_k (d_ik + lambda c_ik) - lambda limit, so the
   returned damage is known to be within `gap` of the optimum.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tmpq_jax.search.budget import Budget
from tmpq_jax.search.space import Genome, SearchSpace


@dataclasses.dataclass(frozen=True)
class KnapsackSolution:
    choice: np.ndarray  # (L,) option index per site
    cost: int  # exact
    damage: float
    lower_bound: float  # no feasible choice has less damage
    exact_program: bool  # the dynamic program ran in exact cost units (then damage is the optimum)

    @property
    def gap(self) -> float:
        return self.damage - self.lower_bound


def _check(costs: np.ndarray, damage: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    costs = np.asarray(costs)
    damage = np.asarray(damage, np.float64)
    if costs.ndim != 2 or costs.shape != damage.shape:
        raise ValueError(f"costs and damage must both be (sites, options), got {costs.shape} and {damage.shape}")
    if not np.issubdtype(costs.dtype, np.integer) or np.any(costs < 0):
        raise ValueError("costs must be non-negative integers (exact BitOPs)")
    if not np.all(np.isfinite(damage)):
        bad = np.argwhere(~np.isfinite(damage))[0]
        raise ValueError(f"damage must be finite; site {bad[0]} option {bad[1]} is {damage[tuple(bad)]}")
    if int(limit) != limit or limit < 0:
        raise ValueError(f"limit must be a non-negative integer number of BitOPs, got {limit!r}")
    cheapest = int(costs.min(1).sum())
    if cheapest > limit:
        raise ValueError(f"no choice fits: the cheapest options cost {cheapest:,} BitOPs > limit {int(limit):,}")
    return costs.astype(np.int64), damage


def lagrangian_bound(costs: np.ndarray, damage: np.ndarray, limit: int, num_lambdas: int = 200) -> float:
    """A lower bound on the damage of every feasible choice (weak duality), maximised over a log grid of lambda."""
    costs, damage = _check(costs, damage, limit)
    c = costs.astype(np.float64)
    spread = np.ptp(damage, axis=1).max()
    unit = max(float(np.ptp(c, axis=1).max()), 1.0)
    lambdas = np.concatenate([[0.0], np.geomspace(1e-6, 1e6, num_lambdas) * max(spread, 1e-12) / unit])
    vals = [(damage + lam * c).min(1).sum() - lam * float(limit) for lam in lambdas]
    return float(max(vals))


def solve(costs, damage, limit: int, max_buckets: int = 1 << 15) -> KnapsackSolution:
    """Minimum summed damage with summed cost <= limit (module docstring). costs: int (L, K), damage: (L, K)."""
    costs, damage = _check(costs, damage, limit)
    limit = int(limit)
    L, K = costs.shape
    g = math.gcd(*(int(x) for x in np.unique(costs)), limit) or 1
    exact = limit // g <= max_buckets
    unit = g if exact else -(-limit // max_buckets)
    units = -(-costs // unit)  # rounded up: a bucketed solution fits in exact BitOPs
    cap = limit // unit
    inf = np.inf
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    arg = np.zeros((L, cap + 1), np.int16)
    for i in range(L):
        new = np.full(cap + 1, inf)
        for k in range(K):
            u = int(units[i, k])
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = best[: cap + 1 - u] + damage[i, k]
            better = cand < new
            new[better] = cand[better]
            arg[i, better] = k
        best = new
    b = int(np.argmin(best))  # least damage over every total cost <= cap
    if not np.isfinite(best[b]):
        raise ValueError("no choice fits the budget in bucketed costs; raise max_buckets")
    choice = np.zeros(L, np.int64)
    for i in range(L - 1, -1, -1):
        choice[i] = arg[i, b]
        b -= int(units[i, choice[i]])
    choice = fill(costs, damage, limit, choice)
    cost = int(costs[np.arange(L), choice].sum())
    dmg = float(damage[np.arange(L), choice].sum())
    return KnapsackSolution(choice, cost, dmg, min(lagrangian_bound(costs, damage, limit), dmg), exact)


def fill(costs, damage, limit: int, choice) -> np.ndarray:
    """Greedy exact fill: repeatedly take the single-site move with the largest damage decrease that fits the
    exact slack. Never raises the cost above `limit`, never raises the damage."""
    costs, damage = np.asarray(costs, np.int64), np.asarray(damage, np.float64)
    choice = np.array(choice, np.int64, copy=True)
    rows = np.arange(len(choice))
    for _ in range(costs.size):
        cur_c, cur_d = costs[rows, choice], damage[rows, choice]
        slack = int(limit) - int(cur_c.sum())
        gain = cur_d[:, None] - damage  # > 0: the move lowers the damage
        ok = (costs - cur_c[:, None] <= slack) & (gain > 1e-12 * max(1.0, np.abs(damage).max()))
        if not ok.any():
            break
        i, k = np.unravel_index(np.argmax(np.where(ok, gain, -np.inf)), gain.shape)
        choice[i] = k
    return choice


# --- bits of a search space as a knapsack ------------------------------------------------------------------------


def site_options(budget: Budget) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (w, a) index pairs per site: w_idx (K,), a_idx (K,), and exact costs int64 (L, K) (pinned bits
    resolved, so a pinned operand's options cost the same)."""
    nb = len(budget.bit_choices)
    w_idx, a_idx = (x.reshape(-1) for x in np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij"))
    choices = np.asarray(budget.bit_choices, np.int64)
    L = len(budget.macs)
    costs = budget.site_costs(np.broadcast_to(choices[w_idx], (L, len(w_idx))).T,
                              np.broadcast_to(choices[a_idx], (L, len(a_idx))).T).T  # (L, K)
    return w_idx, a_idx, costs


def additive_damage(w_damage: np.ndarray, a_damage: np.ndarray, w_idx: np.ndarray, a_idx: np.ndarray,
                    budget: Budget, weight: float = 0.5) -> np.ndarray:
    """(L, K) damage of each option: weight x w_damage[site, w] + (1 - weight) x a_damage[site, a], both (L, B)
    with 0 at the top bit-width; a pinned operand adds nothing."""
    w_damage, a_damage = np.asarray(w_damage, np.float64), np.asarray(a_damage, np.float64)
    fw, fa = np.asarray(budget.fixed_w) > 0, np.asarray(budget.fixed_a) > 0
    dw = np.where(fw[:, None], 0.0, w_damage[:, w_idx])
    da = np.where(fa[:, None], 0.0, a_damage[:, a_idx])
    return 2.0 * (weight * dw + (1.0 - weight) * da)


def knapsack_genomes(budget: Budget, space: SearchSpace, w_damage, a_damage,
                     weights=(0.25, 0.5, 0.75), max_buckets: int = 1 << 15) -> tuple[list[Genome], list[KnapsackSolution]]:
    """One genome per damage weighting (DDIM-quad timesteps), each the knapsack optimum under the budget."""
    if not space.search_bits:
        raise ValueError("the knapsack chooses bits; this space does not search them")
    w_idx, a_idx, costs = site_options(budget)
    genomes, sols = [], []
    for wt in weights:
        if not 0.0 <= wt <= 1.0:
            raise ValueError(f"damage weighting {wt!r} must be in [0, 1]")
        sol = solve(costs, additive_damage(w_damage, a_damage, w_idx, a_idx, budget, wt), budget.limit, max_buckets)
        genomes.append(Genome(np.asarray(space.seed().timestep_idx, np.int32), w_idx[sol.choice].astype(np.int32),
                              a_idx[sol.choice].astype(np.int32)))
        sols.append(sol)
    return genomes, sols
