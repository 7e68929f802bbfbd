"""The TMPQ-DM evolutionary search, evosax-style: static settings in the object, state in a struct, pure
key-first `init` / `ask` / `tell`. Fitness is minimised; NaN counts as +inf (infeasible).

Each generation (reference code): `num_mutation` mutations of random top-k parents (each gene resampled with
probability `mutation_prob`), `num_crossover` uniform crossovers of two random parents, and random candidates for
the rest. The first population is the seed, `num_mutation` mutations of the seed, and random candidates.
Parents are the top-k of everything evaluated so far.

`tell` takes a fitness (P,) or lexicographic keys (P, 2) = [primary, score]: the driver's successive halving tells
[fidelity levels not reached, score at the level reached], so a candidate that reached a higher fidelity ranks
first, then the better score there, with no float offsets (`lexicographic_order`).
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

from tmpq_jax.search.space import Genome, SearchSpace


@flax.struct.dataclass
class EvoState:
    top_genomes: Genome  # (k, ...) best seen so far, sorted by fitness
    top_fitness: jax.Array  # (k,) score (the secondary key)
    top_primary: jax.Array  # (k,) primary key (fidelity levels not reached; 0 for a plain fitness)
    generation: jax.Array


def clean_fitness(fitness: jax.Array) -> jax.Array:
    """NaN -> +inf, so a broken candidate is infeasible, never a crash."""
    return jnp.where(jnp.isnan(fitness), jnp.inf, fitness)


def ranking_keys(fitness: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(primary, score) of a told fitness: (P,) -> (0, fitness); (P, 2) -> its columns. NaN -> +inf in both."""
    f = clean_fitness(jnp.asarray(fitness, jnp.float32))
    if f.ndim == 1:
        return jnp.zeros_like(f), f
    if f.ndim != 2 or f.shape[1] != 2:
        raise ValueError(f"fitness must be (P,) scores or (P, 2) keys [primary, score], got shape {f.shape}")
    return f[:, 0], f[:, 1]


def lexicographic_order(primary: jax.Array, score: jax.Array) -> jax.Array:
    """Indices sorting by primary, then score, then position (stable): exact, whatever the magnitudes."""
    return jnp.lexsort((jnp.arange(primary.shape[0]), score, primary))


def lexicographic_ranks(primary: jax.Array, score: jax.Array) -> jax.Array:
    """Position of each candidate in `lexicographic_order` (0 = best), as float; +inf where a key is not finite."""
    order = lexicographic_order(primary, score)
    ranks = jnp.zeros(score.shape, jnp.float32).at[order].set(jnp.arange(score.shape[0], dtype=jnp.float32))
    return jnp.where(jnp.isfinite(primary) & jnp.isfinite(score), ranks, jnp.inf)


def _stack(gs: list[Genome]) -> Genome:
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *gs)


def repeats(pop: Genome) -> jax.Array:
    """(P,) True where a genome equals an earlier row of the population."""
    flat = jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(pop)], axis=1)
    same = jnp.all(flat[:, None, :] == flat[None, :, :], axis=-1)
    earlier = jnp.tril(jnp.ones_like(same), k=-1)
    return jnp.any(same & earlier, axis=1)


def mutate(key: jax.Array, g: Genome, space: SearchSpace, prob: float) -> Genome:
    """Resample each gene with probability `prob`: a timestep within its group, a bit among the choices."""
    k_mask, k_new = jax.random.split(key)
    fresh = space.random(k_new)
    masks = [jax.random.bernoulli(k, prob, x.shape) for k, x in zip(jax.random.split(k_mask, 3), jax.tree.leaves(g))]
    leaves = [jnp.where(m, f, x) for m, f, x in zip(masks, jax.tree.leaves(fresh), jax.tree.leaves(g))]
    return space.freeze(jax.tree.unflatten(jax.tree.structure(g), leaves))


def crossover(key: jax.Array, g1: Genome, g2: Genome) -> Genome:
    """Uniform crossover: each gene from either parent with probability 1/2."""
    keys = jax.random.split(key, 3)
    leaves = [jnp.where(jax.random.bernoulli(k, 0.5, a.shape), a, b)
              for k, a, b in zip(keys, jax.tree.leaves(g1), jax.tree.leaves(g2))]
    return jax.tree.unflatten(jax.tree.structure(g1), leaves)


@dataclasses.dataclass(frozen=True)
class EvolutionSearch:
    space: SearchSpace
    population_size: int = 50
    num_parents: int = 10
    num_mutation: int = 25
    num_crossover: int = 10
    mutation_prob: float = 0.25

    def __post_init__(self):
        p = self.population_size
        checks = [("population_size", p >= 2, ">= 2"),
                  ("num_parents", 1 <= self.num_parents <= p, f"in [1, population_size={p}]"),
                  ("num_mutation", self.num_mutation >= 0, ">= 0"),
                  ("num_crossover", self.num_crossover >= 0, ">= 0"),
                  ("num_mutation + num_crossover", self.num_mutation + self.num_crossover <= p - 1,
                   f"<= population_size - 1 = {p - 1}"),
                  ("mutation_prob", 0.0 < self.mutation_prob <= 1.0, "in (0, 1]")]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name, self.num_mutation + self.num_crossover)} is invalid; "
                                 f"valid range: {valid}")

    def init(self, key: jax.Array) -> EvoState:
        del key
        k = self.num_parents
        seed = self.space.seed()
        genomes = jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), seed)
        return EvoState(genomes, jnp.full((k,), jnp.inf), jnp.full((k,), jnp.inf), jnp.asarray(0, jnp.int32))

    def ask(self, key: jax.Array, state: EvoState) -> tuple[Genome, EvoState]:
        p, m, c = self.population_size, self.num_mutation, self.num_crossover
        k_par, k_mut, k_p1, k_p2, k_cross, k_rand, k_first = jax.random.split(key, 7)
        space = self.space
        random_fill = jax.vmap(space.random)(jax.random.split(k_rand, p - m - c))
        # generation 0: the seed, mutations of the seed, random candidates
        seed = space.seed()
        seeds = jax.tree.map(lambda x: jnp.broadcast_to(x, (m, *x.shape)), seed)
        first = _stack([jax.tree.map(lambda x: x[None], seed),
                        jax.vmap(lambda k, g: mutate(k, g, space, self.mutation_prob))(jax.random.split(k_first, m), seeds),
                        jax.vmap(space.random)(jax.random.split(k_rand, p - m - 1))])
        # later: mutations and crossovers of the top-k, random fill
        valid = jnp.isfinite(state.top_fitness) & jnp.isfinite(state.top_primary)
        n_valid = jnp.maximum(jnp.sum(valid), 1)

        def pick(k, n):
            return jnp.floor(jax.random.uniform(k, (n,)) * n_valid).astype(jnp.int32)

        parents = state.top_genomes
        take = lambda idx: jax.tree.map(lambda x: x[idx], parents)  # noqa: E731
        mutants = jax.vmap(lambda k, g: mutate(k, g, space, self.mutation_prob))(
            jax.random.split(k_mut, m), take(pick(k_par, m)))
        children = jax.vmap(crossover)(jax.random.split(k_cross, c), take(pick(k_p1, c)), take(pick(k_p2, c)))
        later = _stack([mutants, children, random_fill])
        return jax.tree.map(lambda a, b: jnp.where(state.generation == 0, a, b), first, later), state

    def tell(self, key: jax.Array, population: Genome, fitness: jax.Array, state: EvoState) -> EvoState:
        """Keep the top-k distinct genomes of everything seen (a repeat of a kept genome is not kept twice), in
        lexicographic order of (primary, score) (`ranking_keys`)."""
        del key
        primary, score = ranking_keys(fitness)
        all_g = _stack([state.top_genomes, population])
        all_p = jnp.concatenate([state.top_primary, primary])
        all_f = jnp.concatenate([state.top_fitness, score])
        by_fit = lexicographic_order(all_p, all_f)  # best first, so a repeat keeps its best-ranked copy
        all_g = jax.tree.map(lambda x: x[by_fit], all_g)
        rep = repeats(all_g)
        all_p, all_f = jnp.where(rep, jnp.inf, all_p[by_fit]), jnp.where(rep, jnp.inf, all_f[by_fit])
        order = lexicographic_order(all_p, all_f)[: self.num_parents]
        return EvoState(jax.tree.map(lambda x: x[order], all_g), all_f[order], all_p[order], state.generation + 1)

    def best(self, state: EvoState) -> tuple[Genome, jax.Array]:
        return jax.tree.map(lambda x: x[0], state.top_genomes), state.top_fitness[0]


# --- evosax strategies through a continuous-to-discrete decode ---------------------------------------------------


@flax.struct.dataclass
class EvosaxState:
    inner: object  # the evosax algorithm state
    params: object  # the evosax algorithm params
    generation: jax.Array


@dataclasses.dataclass(frozen=True)
class EvosaxSearch:
    """Run an evosax algorithm (e.g. 'CMA_ES', 'SimpleGA') on x in [0, 1)^D, D = N + 2L.

    Gene j decodes to floor(clip(x_j, 0, 1) * size_j): a timestep offset within its group or a bit index.
    evosax minimises, as we do; NaN fitness is passed on as +inf. `tell` encodes the told genomes (cell centres),
    so candidates changed after `ask` (budget repair, redrawn duplicates) are what the strategy learns from.
    """

    space: SearchSpace
    algorithm: str = "CMA_ES"
    population_size: int = 50

    def _sizes(self) -> jnp.ndarray:
        nb = len(self.space.bit_choices)
        return jnp.concatenate([jnp.asarray(self.space.group_sizes), jnp.full(2 * self.space.num_sites, nb)])

    def _strategy(self):
        import evosax.algorithms as algorithms

        if not hasattr(algorithms, self.algorithm):
            raise ValueError(f"evosax has no algorithm {self.algorithm!r}; e.g. 'CMA_ES', 'SimpleGA', 'Open_ES'")
        return getattr(algorithms, self.algorithm)(population_size=self.population_size,
                                                   solution=jnp.zeros(self.num_dims))

    @property
    def num_dims(self) -> int:
        return self.space.num_steps + 2 * self.space.num_sites

    def decode(self, x: jax.Array) -> Genome:
        sizes = self._sizes()
        idx = jnp.clip(jnp.floor(jnp.clip(x, 0.0, 1.0) * sizes), 0, sizes - 1).astype(jnp.int32)
        n, L = self.space.num_steps, self.space.num_sites
        return self.space.freeze(Genome(idx[..., :n], idx[..., n:n + L], idx[..., n + L:]))

    def encode(self, g: Genome) -> jax.Array:
        idx = jnp.concatenate([g.timestep_idx, g.w_bit_idx, g.a_bit_idx], axis=-1)
        return (idx + 0.5) / self._sizes()

    def init(self, key: jax.Array) -> EvosaxState:
        from evosax.algorithms.distribution_based.base import DistributionBasedAlgorithm

        es = self._strategy()
        params = es.default_params
        k_init, k_pop = jax.random.split(key)
        seed_x = self.encode(self.space.seed())
        if isinstance(es, DistributionBasedAlgorithm):
            inner = es.init(k_init, seed_x, params)
        else:
            pop = jax.random.uniform(k_pop, (self.population_size, self.num_dims)).at[0].set(seed_x)
            inner = es.init(k_init, pop, jnp.full((self.population_size,), jnp.inf), params)
        return EvosaxState(inner, params, jnp.asarray(0, jnp.int32))

    def ask(self, key: jax.Array, state: EvosaxState) -> tuple[Genome, EvosaxState]:
        x, inner = self._strategy().ask(key, state.inner, state.params)
        return self.decode(x), state.replace(inner=inner)

    def tell(self, key: jax.Array, population: Genome, fitness: jax.Array, state: EvosaxState) -> EvosaxState:
        """evosax takes scalars: the scores themselves when every candidate shares the primary key (one fidelity
        level), else their exact lexicographic ranks within this population (0 = best; strategies that compare
        values across generations, such as elitist GAs, then compare ranks)."""
        primary, score = ranking_keys(fitness)
        scalar = jnp.where(jnp.all(primary == primary[0]), score, lexicographic_ranks(primary, score))
        inner, _ = self._strategy().tell(key, self.encode(population), scalar, state.inner, state.params)
        return state.replace(inner=inner, generation=state.generation + 1)
