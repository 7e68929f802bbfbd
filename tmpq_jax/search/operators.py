"""Local variation operators of the joint search and the Pareto front of (BitOPs, fitness).

The reference GA resamples each gene with probability 0.25: a mutant of a 234-gene genome changes about 58 genes and
lands far from its parent. These operators move locally:
- `mutate_local`: each searched gene changes with probability expected_genes / D (D searched genes), a bit index by
  one ordinal step (+1 or -1; at an end of the choices the one move that stays inside), a timestep to another
  offset inside its group;
- `block_crossover`: whole blocks of sites (and the timestep axis as one block) from either parent;
- `swap` (host, exact BitOPs): raise one site's operand by one step and pay for it by lowering the operands with the
  least damage per BitOP saved, so the cost stays within the budget;
- `pareto_front`: indices of the non-dominated (cost, score) points, both minimised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.search.budget import Budget
from tmpq_jax.search.space import Genome, SearchSpace


def searched_genes(space: SearchSpace) -> int:
    return space.num_steps * space.search_timesteps + 2 * space.num_sites * space.search_bits


def ordinal_step(key: jax.Array, idx: jax.Array, num_choices: int) -> jax.Array:
    """idx +- 1, the direction drawn at random; at either end the only move that stays in [0, num_choices)."""
    up = jax.random.bernoulli(key, 0.5, idx.shape)
    up = jnp.where(idx == 0, True, jnp.where(idx == num_choices - 1, False, up))
    return jnp.where(up, idx + 1, idx - 1).astype(idx.dtype)


def mutate_local(key: jax.Array, g: Genome, space: SearchSpace, expected_genes: float = 2.0) -> Genome:
    """Change each searched gene with probability expected_genes / D (module docstring)."""
    d = searched_genes(space)
    if d == 0:
        return g
    p = min(1.0, float(expected_genes) / d)
    k_t, k_w, k_a, k_mt, k_mw, k_ma, k_dt = jax.random.split(key, 7)
    sizes = jnp.asarray(space.group_sizes)
    # a timestep moves to one of the other offsets of its group (none where the group has one timestep)
    shift = 1 + jnp.floor(jax.random.uniform(k_dt, g.timestep_idx.shape) * jnp.maximum(sizes - 1, 1)).astype(jnp.int32)
    new_t = jnp.where(sizes > 1, (g.timestep_idx + shift) % sizes, g.timestep_idx)
    nb = len(space.bit_choices)
    new_w, new_a = ordinal_step(k_w, g.w_bit_idx, nb), ordinal_step(k_a, g.a_bit_idx, nb)
    if nb == 1:
        new_w, new_a = g.w_bit_idx, g.a_bit_idx
    out = Genome(jnp.where(jax.random.bernoulli(k_mt, p, g.timestep_idx.shape), new_t, g.timestep_idx),
                 jnp.where(jax.random.bernoulli(k_mw, p, g.w_bit_idx.shape), new_w, g.w_bit_idx),
                 jnp.where(jax.random.bernoulli(k_ma, p, g.a_bit_idx.shape), new_a, g.a_bit_idx))
    return space.freeze(out)


def block_ids(paths, depth: int = 3) -> np.ndarray:
    """(L,) block number of each site: sites whose paths share the first `depth` components are one block
    (e.g. 'unet/down_blocks_1/resnets_0')."""
    names = ["/".join(p.split("/")[:depth]) for p in paths]
    uniq = {n: i for i, n in enumerate(dict.fromkeys(names))}
    return np.asarray([uniq[n] for n in names], np.int32)


def block_crossover(key: jax.Array, g1: Genome, g2: Genome, blocks: np.ndarray) -> Genome:
    """Each block of sites (weights and activations together) from either parent with probability 1/2; the
    timesteps as one more block. `blocks`: (L,) static block ids (numpy)."""
    k_b, k_t = jax.random.split(key)
    blocks = np.asarray(blocks)
    take1 = jax.random.bernoulli(k_b, 0.5, (int(blocks.max()) + 1,))[jnp.asarray(blocks)]
    take_t = jax.random.bernoulli(k_t, 0.5)
    return Genome(jnp.where(take_t, g1.timestep_idx, g2.timestep_idx),
                  jnp.where(take1, g1.w_bit_idx, g2.w_bit_idx), jnp.where(take1, g1.a_bit_idx, g2.a_bit_idx))


def swap(rng: np.random.Generator, g: Genome, budget: Budget, w_damage: np.ndarray, a_damage: np.ndarray) -> Genome:
    """Budget-neutral swap on the host (exact BitOPs): raise one random searched operand (below the top) by one
    choice, then lower other operands, least damage per BitOP saved first, until the cost fits `budget.limit`.
    damage (L, B): the fitness change of each site's operand at each bit index (0 at the top). Returns `g`
    unchanged if the raise cannot be paid for."""
    w, a = np.array(g.w_bit_idx, np.int64), np.array(g.a_bit_idx, np.int64)
    nb = len(budget.bit_choices)
    searched = np.concatenate([np.asarray(budget.fixed_w) == 0, np.asarray(budget.fixed_a) == 0])
    idx = np.concatenate([w, a])
    raisable = np.flatnonzero(searched & (idx > 0))
    if len(raisable) == 0:
        return g
    L = len(w)
    j = int(rng.choice(raisable))
    idx[j] -= 1
    dmg = np.concatenate([np.asarray(w_damage, np.float64), np.asarray(a_damage, np.float64)])  # (2L, B)
    choices = np.asarray(budget.bit_choices, np.int64)
    for _ in range(2 * L * nb):
        cost = budget.cost(choices[idx[:L]], choices[idx[L:]])
        if cost <= budget.limit:
            return Genome(np.asarray(g.timestep_idx), idx[:L].astype(np.int32), idx[L:].astype(np.int32))
        can = searched & (idx < nb - 1)
        can[j] = False
        if not can.any():
            return g
        saved = np.zeros(2 * L)
        extra = np.zeros(2 * L)
        for k in np.flatnonzero(can):
            trial = idx.copy()
            trial[k] += 1
            saved[k] = cost - budget.cost(choices[trial[:L]], choices[trial[L:]])
            extra[k] = dmg[k, trial[k]] - dmg[k, idx[k]]
        ratio = np.where(can & (saved > 0), extra / np.maximum(saved, 1), np.inf)
        idx[int(np.argmin(ratio))] += 1
    return g


def pareto_front(costs, scores) -> np.ndarray:
    """Indices of the points no other point dominates (cost <= and score <=, one strictly), sorted by cost;
    NaN scores are never on the front; of exact duplicates the first is kept."""
    costs = np.asarray(costs, np.float64)
    scores = np.where(np.isnan(np.asarray(scores, np.float64)), np.inf, np.asarray(scores, np.float64))
    order = np.lexsort((np.arange(len(costs)), scores, costs))
    front, best = [], np.inf
    for i in order:
        if np.isfinite(scores[i]) and scores[i] < best:
            front.append(int(i))
            best = scores[i]
    return np.asarray(front, np.int64)
