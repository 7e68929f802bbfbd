"""A joint search that moves locally (evosax-style init / ask / tell, minimising).

Each generation: `num_mutation` local mutants (`operators.mutate_local`, about `expected_genes` genes each) of
random top-k parents, `num_crossover` block-wise crossovers of two parents, and for the rest wider local mutants
(4x the genes) of the best parent instead of uniform random candidates. Generation 0 is the seed and its local
mutants; the driver puts the warm start (knapsack solutions, greedy_bits, single-axis bests) into its last rows.
Parents are the top-k of everything evaluated (as `EvolutionSearch.tell`).

On the host, `make_fill` spends budget a repaired genome left unused: the exact knapsack fill
(`knapsack.fill`) with the additive damage of the sensitivities, raising the operands whose damage per BitOP is
largest while the exact cost fits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.search import knapsack, operators
from tmpq_jax.search.algorithm import EvolutionSearch, EvoState, _stack
from tmpq_jax.search.budget import Budget
from tmpq_jax.search.space import Genome


@dataclasses.dataclass(frozen=True)
class LocalSearch(EvolutionSearch):
    expected_genes: float = 2.0
    blocks: tuple[int, ...] = ()  # (L,) block id of each site (`operators.block_ids`); () = each site its own block

    def __post_init__(self):
        super().__post_init__()
        if not self.expected_genes > 0:
            raise ValueError(f"expected_genes={self.expected_genes} is invalid; valid range: > 0")
        if self.blocks and len(self.blocks) != self.space.num_sites:
            raise ValueError(f"blocks lists {len(self.blocks)} sites, the space has {self.space.num_sites}")

    def _blocks(self) -> np.ndarray:
        return np.asarray(self.blocks if self.blocks else np.arange(self.space.num_sites), np.int32)

    def ask(self, key: jax.Array, state: EvoState) -> tuple[Genome, EvoState]:
        p, m, c = self.population_size, self.num_mutation, self.num_crossover
        k_par, k_mut, k_p1, k_p2, k_cross, k_wide, k_first = jax.random.split(key, 7)
        space, e = self.space, self.expected_genes
        local = lambda k, g, n: operators.mutate_local(k, g, space, n)  # noqa: E731
        seeds = jax.tree.map(lambda x: jnp.broadcast_to(x, (p - 1, *x.shape)), space.seed())
        first = _stack([jax.tree.map(lambda x: x[None], space.seed()),
                        jax.vmap(lambda k, g: local(k, g, e))(jax.random.split(k_first, p - 1), seeds)])
        valid = jnp.isfinite(state.top_fitness) & jnp.isfinite(state.top_primary)
        n_valid = jnp.maximum(jnp.sum(valid), 1)

        def pick(k, n):
            return jnp.floor(jax.random.uniform(k, (n,)) * n_valid).astype(jnp.int32)

        take = lambda idx: jax.tree.map(lambda x: x[idx], state.top_genomes)  # noqa: E731
        mutants = jax.vmap(lambda k, g: local(k, g, e))(jax.random.split(k_mut, m), take(pick(k_par, m)))
        blocks = self._blocks()
        children = jax.vmap(lambda k, a, b: operators.block_crossover(k, a, b, blocks))(
            jax.random.split(k_cross, c), take(pick(k_p1, c)), take(pick(k_p2, c)))
        best = jax.tree.map(lambda x: jnp.broadcast_to(x[0], (p - m - c, *x.shape[1:])), state.top_genomes)
        wide = jax.vmap(lambda k, g: local(k, g, 4 * e))(jax.random.split(k_wide, p - m - c), best)
        later = _stack([mutants, children, wide])
        return jax.tree.map(lambda a, b: jnp.where(state.generation == 0, a, b), first, later), state


def make_fill(budget: Budget, w_damage: np.ndarray, a_damage: np.ndarray, weight: float = 0.5):
    """fill(pop) -> pop: each genome's bits after the exact knapsack fill (`knapsack.fill`) under the budget;
    timesteps unchanged, genomes over the budget unchanged (repair them first). The options and their damage are
    built once here, not per generation."""
    w_idx, a_idx, costs = knapsack.site_options(budget)
    damage = knapsack.additive_damage(w_damage, a_damage, w_idx, a_idx, budget, weight)
    nb = len(budget.bit_choices)
    rows = np.arange(costs.shape[0])

    def fill(pop: Genome) -> Genome:
        w, a = np.array(pop.w_bit_idx, np.int64, copy=True), np.array(pop.a_bit_idx, np.int64, copy=True)
        for i in range(len(w)):
            choice = w[i] * nb + a[i]  # site_options enumerates (w, a) in row-major order
            if costs[rows, choice].sum() > budget.limit:
                continue
            choice = knapsack.fill(costs, damage, budget.limit, choice)
            w[i], a[i] = w_idx[choice], a_idx[choice]
        return pop.replace(w_bit_idx=w.astype(np.int32), a_bit_idx=a.astype(np.int32))

    return fill

