import dataclasses
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax import quant
from tmpq_jax.search import EvolutionSearch, EvosaxSearch, Genome, SearchSpace, crossover, make_repair, mutate
from tmpq_jax.search import run as run_mod

ROOT = Path(__file__).resolve().parents[1]
SPACE = SearchSpace.create(10, 7)
TARGET = jnp.asarray(SPACE.group_sizes) // 2


def toy_fitness(g: Genome) -> jax.Array:
    return (jnp.sum(jnp.abs(g.timestep_idx - TARGET), -1) + jnp.sum(g.w_bit_idx, -1) + jnp.sum(g.a_bit_idx, -1)
            ).astype(jnp.float32)


ALGORITHMS = [EvolutionSearch(SPACE, 12, 4, 5, 3), EvosaxSearch(SPACE, "CMA_ES", 8), EvosaxSearch(SPACE, "SimpleGA", 8)]


@pytest.mark.parametrize("algo", ALGORITHMS, ids=["evolution", "CMA_ES", "SimpleGA"])
def test_python_loop_equals_lax_scan(algo):
    key = jax.random.key(0)

    def step(state, gen):
        k = jax.random.fold_in(key, gen)
        pop, state = algo.ask(k, state)
        fit = toy_fitness(pop)
        return algo.tell(k, pop, fit, state), jnp.min(fit)

    state = algo.init(key)
    loop_best = []
    for gen in range(6):
        state, b = jax.jit(step)(state, gen)
        loop_best.append(float(b))
    scan_state, scan_best = jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(6)))(algo.init(key))
    np.testing.assert_array_equal(np.asarray(scan_best), loop_best)
    for a, b in zip(jax.tree.leaves(scan_state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_evolution_improves_and_keeps_seed_first():
    algo = ALGORITHMS[0]
    key = jax.random.key(1)
    state = algo.init(key)
    pop, _ = algo.ask(key, state)
    first = jax.tree.map(lambda x: x[0], pop)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(SPACE.seed())):
        np.testing.assert_array_equal(a, b)
    best = []
    for gen in range(12):
        k = jax.random.fold_in(key, gen)
        pop, state = algo.ask(k, state)
        state = algo.tell(k, pop, toy_fitness(pop), state)
        best.append(float(state.top_fitness[0]))
    assert best == sorted(best, reverse=True) and best[-1] < best[0] * 0.7


def test_operators_respect_groups_and_choices():
    keys = jax.random.split(jax.random.key(2), 500)
    sizes = SPACE.group_sizes
    rand = jax.vmap(SPACE.random)(keys)
    mutants = jax.vmap(lambda k, g: mutate(k, g, SPACE, 0.5))(keys, rand)
    children = jax.vmap(crossover)(keys, rand, mutants)
    for pop in (rand, mutants, children):
        t = np.asarray(pop.timestep_idx)
        assert t.min() >= 0 and np.all(t < sizes) and np.all(t.max(0) > 0)
        for b in (pop.w_bit_idx, pop.a_bit_idx):
            assert set(np.unique(b).tolist()) == {0, 1, 2, 3}
        ts = np.asarray(jax.vmap(SPACE.timesteps)(pop))
        assert np.all(np.diff(ts, axis=1) < 0) and ts.min() >= 0 and ts.max() <= 999
    # each gene is resampled with probability 0.5; a resampled bit differs from the old one with p = 3/4
    rate = np.mean(np.asarray(mutants.w_bit_idx != rand.w_bit_idx)) / 0.75
    assert 0.4 < rate < 0.6, rate
    # frozen parts stay at the seed
    frozen = SPACE.restrict(search_timesteps=False)
    m = jax.vmap(lambda k: mutate(k, frozen.random(k), frozen, 1.0))(keys)
    assert int(jnp.max(m.timestep_idx)) == 0 and int(jnp.max(m.w_bit_idx)) > 0


def sites_with_macs(macs):
    return quant.SiteTable(tuple(quant.Site(f"site{i}", "conv", int(m), 1) for i, m in enumerate(macs)))


def test_repair_never_exceeds_budget_and_lowers_costliest():
    sites = sites_with_macs([1000, 10, 10, 500, 10, 10, 10])
    budget = float(make_repair(SPACE, sites, 0.0).bitops(SPACE.uniform_bits(6)))
    repair = jax.jit(jax.vmap(make_repair(SPACE, sites, budget)))
    pop = jax.vmap(SPACE.random)(jax.random.split(jax.random.key(3), 300))
    pop = pop.replace(w_bit_idx=jnp.zeros_like(pop.w_bit_idx))  # all 8-bit weights: mostly over budget
    fixed_pop, bitops, feasible = repair(pop)
    assert bool(jnp.all(feasible)) and float(jnp.max(bitops)) <= budget
    all8 = SPACE.uniform_bits(8)
    g, b, ok = make_repair(SPACE, sites, budget)(all8)
    assert bool(ok) and int(g.w_bit_idx[0]) > 0 and int(g.w_bit_idx[1]) == 0  # the big site paid first
    # an impossible budget: bounded loop, reported infeasible
    g, b, ok = make_repair(SPACE, sites, 1.0)(all8)
    assert not bool(ok) and int(jnp.min(g.w_bit_idx)) == 3


def test_nan_fitness_is_infeasible():
    algo = ALGORITHMS[0]
    key = jax.random.key(4)
    state = algo.init(key)
    pop, state = algo.ask(key, state)
    fit = toy_fitness(pop).at[0].set(jnp.nan).at[1].set(-1e9 * 0 + jnp.nan)
    state = algo.tell(key, pop, fit, state)
    assert bool(jnp.all(jnp.isfinite(state.top_fitness)))
    assert float(state.top_fitness[0]) == float(jnp.min(toy_fitness(pop)[2:]))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(num_steps=1001, num_sites=3), r"num_steps must be an integer in \[1, 1000\]"),
    (dict(num_steps=200, num_sites=3), "empty timestep groups"),
    (dict(num_steps=4, num_sites=3, bit_choices=[8, 1]), r"\[1\] outside the valid range \[2, 16\]"),
    (dict(num_steps=4, num_sites=3, spacing="log"), "unknown timestep spacing 'log'"),
    (dict(num_steps=3, num_sites=3, spacing="custom", starts=[0, 5, 5]), "empty timestep groups"),
    (dict(num_steps=4, num_sites=3, seed_bits=4), "seed_bits=4"),
])
def test_invalid_spaces(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SearchSpace.create(**kwargs)


def test_groups_follow_the_reference_spacing():
    assert SPACE.groups == [(0, 8), (9, 38), (39, 87), (88, 157), (158, 245), (246, 354), (355, 482), (483, 631),
                            (632, 799), (800, 999)]
    np.testing.assert_array_equal(SPACE.timesteps(SPACE.seed()), [800, 632, 483, 355, 246, 158, 88, 39, 9, 0])


@pytest.mark.parametrize("field,value,msg", [
    ("population_size", 1, "population_size=1"), ("num_parents", 0, "num_parents=0"),
    ("num_mutation", 20, "num_mutation \\+ num_crossover"), ("mutation_prob", 0.0, "mutation_prob=0.0")])
def test_bad_algorithm_settings(field, value, msg):
    kwargs = dict(space=SPACE, population_size=10, num_parents=4, num_mutation=5, num_crossover=2)
    kwargs[field] = value
    with pytest.raises(ValueError, match=msg):
        EvolutionSearch(**kwargs)


def _config():
    sys.path.insert(0, str(ROOT / "experiments" / "configs"))
    import tiny

    return tiny.get_config()


@pytest.mark.parametrize("field,value,msg", [
    ("num_steps", 0, r"num_steps=0 is invalid; valid: an integer in \[1, 1000\]"),
    ("budget_bits", 4, r"budget_bits=4 is invalid; valid: one of bit_choices"),
    ("search_samples", 1, "search_samples=1"), ("strategy", "fast", "strategy='fast'"),
    ("budget_mode", "clamp", "budget_mode='clamp'"), ("model", "nope", "unknown model 'nope'"),
    ("baselines", ["random"], "unknown entry 'random'"), ("bit_choices", [8, 32], r"\[32\] outside")])
def test_bad_config_values(field, value, msg):
    c = _config()
    c[field] = value
    with pytest.raises(ValueError, match=msg):
        run_mod.validate_config(c)


def test_impossible_budget_is_a_clear_error(tmp_path):
    c = _config()
    c.budget_bitops = 1.0
    with pytest.raises(ValueError, match="budget 1 BitOPs is impossible: the cheapest candidate"):
        run_mod.run_search(c, str(tmp_path))


# --- resume, on a stub evaluator (no UNet) -----------------------------------------------------------------------


@dataclasses.dataclass
class StubEvaluator:
    calls: int = 0
    sampled: list = dataclasses.field(default_factory=list)
    fail_at: int = -1
    strategy: str = "loop"

    def sample(self, ts, wb, ab, n):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        self.sampled += [(tuple(t), tuple(w), tuple(a)) for t, w, a in zip(np.asarray(ts), np.asarray(wb),
                                                                          np.asarray(ab))]
        return np.asarray(jnp.sum(ts, -1) * 1e-3 + jnp.sum(wb * ab, -1) * 1e-2)

    def score(self, images):
        out = np.array(images, np.float64)
        out[np.round(out * 1e3) % 3 == 0] = np.nan  # a fixed subset of candidates "breaks"
        return out


def _ctx(tmp_path, evaluator):
    c = _config()
    c.generations, c.population_size, c.num_parents, c.num_mutation, c.num_crossover = 5, 8, 3, 3, 2
    space = SearchSpace.create(4, 6)
    sites = sites_with_macs(np.arange(1, 7) * 100)
    budget = float(make_repair(space, sites, 0).bitops(space.uniform_bits(6)))
    return run_mod.Context(c, tmp_path, sites, space, evaluator, make_repair(space, sites, budget), budget,
                           {}), space


def test_interrupted_search_resumes_to_the_same_result(tmp_path):
    ctx, space = _ctx(tmp_path / "a", StubEvaluator())
    (tmp_path / "a").mkdir()
    straight = run_mod.evolve(ctx, "joint", space, resume=False)

    (tmp_path / "b").mkdir()
    ctx_b, _ = _ctx(tmp_path / "b", StubEvaluator(fail_at=3))
    with pytest.raises(KeyboardInterrupt):
        run_mod.evolve(ctx_b, "joint", space, resume=False)
    ctx_b.evaluator = StubEvaluator()
    resumed = run_mod.evolve(ctx_b, "joint", space, resume=True)
    assert ctx_b.evaluator.calls == 3  # generations 0 and 1 were not redone
    np.testing.assert_array_equal(resumed["log"]["fitness"], straight["log"]["fitness"])
    for a, b in zip(jax.tree.leaves(resumed["log"]["genomes"]), jax.tree.leaves(straight["log"]["genomes"])):
        np.testing.assert_array_equal(a, b)
    assert [h["best"] for h in resumed["history"]] == [h["best"] for h in straight["history"]]
    assert all(math.isfinite(h["best"]) for h in straight["history"])
    assert np.isinf(straight["log"]["fitness"]).any()  # NaN scores became infeasible


def test_search_samples_each_distinct_candidate_once(tmp_path):
    (tmp_path / "a").mkdir()
    ctx, space = _ctx(tmp_path / "a", StubEvaluator())
    result = run_mod.evolve(ctx, "joint", space, resume=False)
    decoded = jax.vmap(jax.vmap(space.decode))(result["log"]["genomes"])
    seen = {(tuple(t), tuple(w), tuple(a)) for t, w, a in zip(*(np.asarray(x).reshape(-1, x.shape[-1])
                                                                for x in decoded))}
    assert len(ctx.evaluator.sampled) == len(set(ctx.evaluator.sampled)) == len(seen)
    assert len(seen) < result["log"]["fitness"].size  # the population did repeat candidates
    # a repeated candidate has the same fitness wherever it appears
    fit = result["log"]["fitness"].ravel()
    keys = [(tuple(t), tuple(w), tuple(a)) for t, w, a in zip(*(np.asarray(x).reshape(-1, x.shape[-1])
                                                                for x in decoded))]
    for k in set(keys):
        vals = {fit[i] for i, kk in enumerate(keys) if kk == k}
        assert len(vals) == 1


@pytest.mark.parametrize("strategy,sizes", [("loop", [2, 1]), ("map", [4, 4])])
def test_memo_keeps_batched_population_sizes(tmp_path, strategy, sizes):
    ctx, space = _ctx(tmp_path, StubEvaluator(strategy=strategy))
    ts = np.array([[4, 3, 2, 1], [4, 3, 2, 0], [4, 3, 2, 1], [5, 3, 2, 1]])
    bits = np.full((4, 6), 6)
    calls = []
    sample = ctx.evaluator.sample
    ctx.evaluator.sample = lambda t, w, a, n: calls.append(len(t)) or sample(t, w, a, n)
    first = run_mod.evaluate(ctx, ts[:3], bits[:3], bits[:3], 8)  # rows 0 and 2 are the same candidate
    second = run_mod.evaluate(ctx, ts, bits, bits, 8, feasible=np.array([True, True, False, True]))
    assert calls == [sizes[0] if strategy == "loop" else 3, sizes[1]]
    assert first[0] == first[2]
    np.testing.assert_array_equal(second[:2], first[:2])  # from the memo (NaN stays NaN)
    assert np.isinf(second[2])
