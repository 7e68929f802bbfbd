"""The BitOPs budget of a search, in exact integers (TMPQ-DM eq. 6: sum of MACs x w_bits x a_bits over sites and
sampling steps).

All costs are int64 on the host: uniform W6A6 costs exactly its own W6A6 budget, with no tolerance anywhere.
`repair` works within the searched space: it lowers bits only where the space searches bits, and never touches
timesteps (with a fixed N they do not change the cost).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tmpq_jax.quant.sites import SiteTable
from tmpq_jax.search.space import Genome, SearchSpace

INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class Budget:
    """Exact BitOPs per image of candidates of one space; `limit` is the largest feasible cost."""

    limit: int
    macs: tuple[int, ...]  # per site, one UNet forward
    fixed_w: tuple[int, ...]  # pinned bits (rules), 0 where searched
    fixed_a: tuple[int, ...]
    bit_choices: tuple[int, ...]  # descending, as in SearchSpace
    num_steps: int

    @classmethod
    def create(cls, sites: SiteTable, space: SearchSpace, limit: int | None = None, uniform_bits: int = 6):
        """A budget of `limit` BitOPs, or by default the cost of uniform W{b}A{b} at the space's N."""
        b = cls(0, tuple(int(m) for m in sites.macs), tuple(int(s.fixed_w_bits) for s in sites.sites),
                tuple(int(s.fixed_a_bits) for s in sites.sites), tuple(space.bit_choices), space.num_steps)
        if max(b.macs) * 16 * 16 * space.num_steps * len(b.macs) >= INT64_MAX:
            raise ValueError("BitOPs of this model overflow int64")
        if limit is None:
            limit = b.cost_of(space.uniform_bits(uniform_bits))
        if int(limit) != limit or limit < 0:
            raise ValueError(f"budget must be a non-negative integer number of BitOPs, got {limit!r}")
        b = dataclasses.replace(b, limit=int(limit))
        cheapest = b.cost_of(Genome(space.seed().timestep_idx, *(np.full(len(b.macs), len(b.bit_choices) - 1),) * 2))
        if b.limit < cheapest:
            raise ValueError(f"budget {b.limit:,} BitOPs is impossible: the cheapest candidate (all "
                             f"{min(b.bit_choices)}-bit, {space.num_steps} steps) costs {cheapest:,}")
        return b

    # --- cost ---------------------------------------------------------------------------------------------------

    def resolve(self, w_bits, a_bits) -> tuple[np.ndarray, np.ndarray]:
        """Pinned bits (rules) over the candidate's, int64 (..., L)."""
        w, a = np.asarray(w_bits, np.int64), np.asarray(a_bits, np.int64)
        fw, fa = np.asarray(self.fixed_w, np.int64), np.asarray(self.fixed_a, np.int64)
        return np.where(fw > 0, fw, w), np.where(fa > 0, fa, a)

    def site_costs(self, w_bits, a_bits) -> np.ndarray:
        """int64 (..., L): MACs x w x a x N per site."""
        w, a = self.resolve(w_bits, a_bits)
        return np.asarray(self.macs, np.int64) * w * a * np.int64(self.num_steps)

    def cost(self, w_bits, a_bits) -> np.ndarray:
        """Exact BitOPs per image (..., ) as int64."""
        return self.site_costs(w_bits, a_bits).sum(-1)

    def bits_of(self, g: Genome) -> tuple[np.ndarray, np.ndarray]:
        choices = np.asarray(self.bit_choices, np.int64)
        return choices[np.asarray(g.w_bit_idx)], choices[np.asarray(g.a_bit_idx)]

    def cost_of(self, g: Genome):
        """Exact cost of a genome or a population of genomes (int, or int64 array)."""
        c = self.cost(*self.bits_of(g))
        return int(c) if np.ndim(c) == 0 else c

    def is_feasible(self, g: Genome):
        return np.asarray(self.cost_of(g)) <= self.limit

    # --- repair -------------------------------------------------------------------------------------------------

    def repair(self, pop: Genome, space: SearchSpace) -> tuple[Genome, np.ndarray, np.ndarray]:
        """Make a population (P, ...) feasible within `space`: (genomes, cost int64 (P,), feasible (P,)).

        Where the space searches bits, lower the costliest site's larger operand by one choice until the cost fits
        (bounded: each site can be lowered at most 2 (B - 1) times). Where it does not, nothing changes and an
        over-budget candidate stays infeasible. Timesteps are never changed.
        """
        w_idx = np.array(pop.w_bit_idx, np.int64, copy=True)
        a_idx = np.array(pop.a_bit_idx, np.int64, copy=True)
        if space.search_bits:
            nb = len(self.bit_choices)
            choices = np.asarray(self.bit_choices, np.int64)
            searched_w = np.asarray(self.fixed_w) == 0
            searched_a = np.asarray(self.fixed_a) == 0
            rows = np.arange(len(w_idx))
            for _ in range(len(self.macs) * 2 * (nb - 1)):
                cost = self.site_costs(choices[w_idx], choices[a_idx])
                over = cost.sum(-1) > self.limit
                can_w, can_a = searched_w & (w_idx < nb - 1), searched_a & (a_idx < nb - 1)
                over &= np.any(can_w | can_a, axis=-1)
                if not over.any():
                    break
                site = np.argmax(np.where(can_w | can_a, cost, -1), axis=-1)
                r = rows[over]
                s = site[over]
                wb, ab = choices[w_idx[r, s]], choices[a_idx[r, s]]
                lower_w = can_w[r, s] & ((wb >= ab) | ~can_a[r, s])
                w_idx[r[lower_w], s[lower_w]] += 1
                a_idx[r[~lower_w], s[~lower_w]] += 1
        out = pop.replace(w_bit_idx=w_idx.astype(np.int32), a_bit_idx=a_idx.astype(np.int32))
        cost = self.cost(*self.bits_of(out))
        return out, cost, cost <= self.limit

    # --- the greedy baseline ------------------------------------------------------------------------------------

    def greedy_bits(self, space: SearchSpace, a_start: int | None = None) -> Genome:
        """DDIM-quad timesteps; every site at the lowest choice (activations at `a_start` if given), then sites
        raised to the highest choice in order of increasing MACs while the budget allows (ties: site order)."""
        nb = len(self.bit_choices)
        a0 = nb - 1 if a_start is None else self.bit_choices.index(a_start)
        w_idx = np.full(len(self.macs), nb - 1, np.int64)
        a_idx = np.full(len(self.macs), a0, np.int64)
        choices = np.asarray(self.bit_choices, np.int64)
        for s in np.argsort(np.asarray(self.macs), kind="stable"):
            trial_w, trial_a = w_idx.copy(), a_idx.copy()
            trial_w[s] = trial_a[s] = 0
            if self.cost(choices[trial_w], choices[trial_a]) <= self.limit:
                w_idx, a_idx = trial_w, trial_a
        g = Genome(np.zeros(space.num_steps, np.int32), w_idx.astype(np.int32), a_idx.astype(np.int32))
        return jax.tree.map(np.asarray, g)
