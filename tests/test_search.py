import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.search import EvolutionSearch, EvosaxSearch, Genome, SearchSpace, crossover, mutate, repeats
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




def test_tell_keeps_distinct_parents():
    algo = EvolutionSearch(SPACE, 6, 4, 2, 1)
    state = algo.init(jax.random.key(5))
    pop, state = algo.ask(jax.random.key(5), state)
    twice = jax.tree.map(lambda x: jnp.concatenate([x[:3], x[:3]]), pop)  # every genome twice
    assert np.asarray(repeats(twice)).tolist() == [False] * 3 + [True] * 3
    state = algo.tell(jax.random.key(5), twice, jnp.asarray([1.0, 2.0, 3.0, 1.0, 2.0, 3.0]), state)
    kept = np.asarray(state.top_fitness)
    assert kept[:3].tolist() == [1.0, 2.0, 3.0] and np.isinf(kept[3])
    flat = np.concatenate([np.asarray(x)[:3].reshape(3, -1) for x in jax.tree.leaves(state.top_genomes)], 1)
    assert len({r.tobytes() for r in flat}) == 3


# --- config validation (before any expensive step) ---------------------------------------------------------------


def _config():
    sys.path.insert(0, str(ROOT / "experiments" / "configs"))
    import tiny

    return tiny.get_config()


@pytest.mark.parametrize("changes,msg", [
    (dict(num_steps=0), r"num_steps=0 is invalid; valid: an integer in \[1, 1000\]"),
    (dict(budget_bits=4), r"budget_bits=4 is invalid; valid: one of bit_choices"),
    (dict(budget_bitops=-1), r"budget_bitops=-1 is invalid; valid: a whole number"),
    (dict(search_samples=1), "search_samples=1"),
    (dict(search_samples=20), r"select_samples=8 is invalid; valid: >= search_samples=20"),
    (dict(final_samples=4), r"final_samples=4 is invalid; valid: >= search_samples=8"),
    (dict(fidelity_samples=(8, 4)), "fidelity_samples"),
    (dict(fidelity_samples=(2, 6)), r"ending at search_samples=8"),
    (dict(fidelity_keep=0.0), r"fidelity_keep=0.0 is invalid; valid: in \(0, 1\]"),
    (dict(sample_batch=0), r"sample_batch=0 is invalid; valid: an integer >= 1"),
    (dict(fid_batch=0), "fid_batch=0"),
    (dict(strategy="fast"), "strategy='fast'"),
    (dict(model="nope"), "unknown model 'nope'"),
    (dict(baselines=("random",)), "unknown entry 'random'"),
    (dict(bit_choices=(8, 32)), r"\[32\] outside"),
    (dict(metric="fid"), "unknown metric 'fid'"),
    (dict(report_metrics=("nope",)), "config.report_metrics has unknown metric 'nope'"),
    (dict(metric="classifier_fd", fitness_reference="mnist-heldout"), "equals config.report_reference"),
    (dict(model="cifar-ddpm", metric="classifier_fd"), r"config.metric='classifier_fd' uses the MNIST classifier, but the model makes "
                               r"\(32, 32, 3\) samples"),
    (dict(model="cifar-ddpm", metric="teacher_mse", report_metrics=("inception_fid",)),
     r"would compare \(32, 32, 3\) samples with the MNIST reference 'mnist-heldout'"),
    (dict(num_mutation=4), r"num_mutation \+ num_crossover=5 is invalid"),
    (dict(algorithm="CMA-ES"), "evosax has no algorithm 'CMA-ES'"),
    (dict(bit_choices=(7, 6, 5)), r"baselines has 'uniform_w8a8', whose 8 bits are not among config.bit_choices"),
    (dict(seed_bits=8), r"seed_bits=8 differs from config.budget_bits=6"),
    (dict(seed_bits=8, budget_bitops=10**12), None),  # an explicit budget: the seed may be repaired into it
    (dict(sensitivity_probe_bits=(8,)), r"sensitivity_probe_bits=\(8,\) is invalid; valid: one or more of the "
                                        r"lower bit choices \[7, 6, 5\]"),
    (dict(sensitivity_probe_bits=()), "sensitivity_probe_bits"),
    (dict(sensitivity_samples=1), r"sensitivity_samples=1 is invalid; valid: an integer >= 2"),
    (dict(knapsack_weights=(0.5, 1.5)), r"knapsack_weights=\(0.5, 1.5\) is invalid"),
    (dict(algorithm="local", expected_genes=0.0), r"expected_genes=0.0 is invalid; valid range: > 0"),
    (dict(algorithm="local"), None),
    (dict(budgets=(0.75, 0.0)), r"config.budgets has 0.0; valid: fractions of the default budget in \(0, 4\]"),
    (dict(budgets=(12.5,)), r"config.budgets has 12.5; valid: .* whole BitOPs counts > 4"),
    (dict(sensitivity_mac_share=0.0), r"sensitivity_mac_share=0.0 is invalid; valid: in \(0, 1\]"),
    (dict(sensitivity_metric="mse"), r"sensitivity_metric='mse' is invalid; valid: one of \['fitness', 'deviation', 'one_step', 'noise_model'\]"),
    (dict(pareto_generations=-1), r"pareto_generations=-1 is invalid; valid: an integer >= 0"),
    (dict(act_range_norm=0.5), r"act_range_norm=0.5 is invalid; valid: a number >= 1"),
    (dict(act_range_norm=float("nan")), r"act_range_norm=nan is invalid"),
    (dict(act_range_norm=float("inf")), None),
    (dict(unclipped_sites=("net_2$", "(")), r"unclipped_sites=\('net_2\$', '\('\) is invalid; valid: a list of regular "
                                            r"expressions"),
    (dict(unclipped_sites=(3,)), r"unclipped_sites=\(3,\) is invalid"),
    (dict(unclipped_min_bits=1), r"unclipped_min_bits=1 is invalid; valid: an integer bit-width in \[2, 16\]"),
])
def test_bad_config_values(changes, msg):
    c = _config()
    for k, v in changes.items():
        c[k] = v
    if msg is None:
        run_mod.validate_config(c)
        return
    with pytest.raises(ValueError, match=msg):
        run_mod.validate_config(c)


def test_default_configs_validate():
    sys.path.insert(0, str(ROOT / "experiments" / "configs"))
    import default
    import paper

    import search_benchmark_base
    import steps5

    for c in (default.get_config(), paper.get_config(), _config(), steps5.get_config(), search_benchmark_base.get_config()):
        run_mod.validate_config(c)
    assert steps5.get_config().num_steps == 5
    # the default runs the search of issue 17; the reference GA keeps TMPQ-DM's settings under its own config; the
    # search benchmark's base keeps the settings its committed rows ran with
    assert default.get_config().algorithm == "local" and paper.get_config().algorithm == "evolution"
    assert paper.get_config().select_metric == "" and "knapsack" not in paper.get_config().baselines
    b = search_benchmark_base.get_config()
    assert (b.select_metric, b.sensitivity_samples, b.sensitivity_mac_share, b.sample_batch) == ("", 8, 0.9, 16)
    assert b.sensitivity_metric == "fitness" and default.get_config().sensitivity_metric == "deviation"


def test_impossible_budget_is_a_clear_error(tmp_path):
    c = _config()
    c.budget_bitops = 1
    with pytest.raises(ValueError, match="budget 1 BitOPs is impossible: the cheapest candidate"):
        run_mod.run_search(c, str(tmp_path))


# --- groups follow the model's schedule -----------------------------------------------------------------------------


def test_groups_begin_at_the_first_timestep():
    from tmpq_jax.search.space import group_starts

    assert group_starts(10).tolist() == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]  # DESIGN.md Sec. 1
    assert group_starts(10, first_timestep=1).tolist() == [1, 10, 40, 89, 159, 247, 356, 484, 633, 801]
    shifted = SearchSpace.create(4, 3, first_timestep=1)
    assert shifted.starts == (1, 89, 356, 801) and shifted.groups[-1] == (801, 999)
    assert int(np.asarray(shifted.timesteps(shifted.seed())).min()) == 1  # the seed skips t = 0
    assert SearchSpace.create(4, 3, spacing="uniform", first_timestep=1).starts == (1, 251, 501, 751)
    with pytest.raises(ValueError, match=r"custom group starts must begin at >= 1 .*got \[0, 10, 50\]"):
        SearchSpace.create(3, 3, spacing="custom", starts=[0, 10, 50], first_timestep=1)
    assert SearchSpace.create(3, 3, spacing="custom", starts=[1, 10, 50], first_timestep=1).starts == (1, 10, 50)


def test_evosax_gets_scores_at_one_fidelity_and_exact_ranks_across_fidelities(monkeypatch):
    from tmpq_jax.search.algorithm import EvosaxSearch

    told = []

    class Strategy:
        def tell(self, key, x, fitness, inner, params):
            told.append(np.asarray(fitness))
            return inner, None

    algo = EvosaxSearch(SearchSpace.create(3, 2), "CMA_ES", 4)
    monkeypatch.setattr(EvosaxSearch, "_strategy", lambda self: Strategy())
    pop = jax.vmap(algo.space.random)(jax.random.split(jax.random.key(0), 4))
    state = algo.tell(jax.random.key(0), pop, jnp.asarray([0.3, 0.1, jnp.nan, 0.2]), _evosax_state())
    np.testing.assert_allclose(told[-1], [0.3, 0.1, np.inf, 0.2], rtol=1e-7)
    # two levels: full-fidelity candidates (primary 0) first, then by score; 1e-7 apart still ordered
    keys = jnp.asarray([[1, 0.1], [0, 0.5], [1, 0.1 + 1e-7], [0, 0.4]], jnp.float32)
    algo.tell(jax.random.key(0), pop, keys, state)
    np.testing.assert_array_equal(told[-1], [2, 1, 3, 0])


def _evosax_state():
    from tmpq_jax.search.algorithm import EvosaxState

    return EvosaxState(None, None, jnp.asarray(0, jnp.int32))


def test_a_space_seeded_at_other_timesteps_keeps_them_where_timesteps_are_frozen():
    space = SearchSpace.create(4, 3)
    sub = space.restrict(search_timesteps=False).with_seed_timesteps([2, 5, 0, 1])
    assert np.asarray(sub.seed().timestep_idx).tolist() == [2, 5, 0, 1]
    g = sub.random(jax.random.key(0))
    assert np.asarray(g.timestep_idx).tolist() == [2, 5, 0, 1]  # frozen at the new seed, not DDIM-quad
    assert np.asarray(space.seed().timestep_idx).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"one per group, inside the group sizes"):
        space.with_seed_timesteps([0, 0, 0, 999])


def test_encode_inverts_decode_and_names_bad_candidates():
    keys = jax.random.split(jax.random.key(4), 8)
    for k in keys:
        g = jax.tree.map(np.asarray, SPACE.random(k))
        ts, wb, ab = (np.asarray(x) for x in SPACE.decode(g))
        back = SPACE.encode(ts, wb, ab)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(g)):
            np.testing.assert_array_equal(x, y)
    ts, wb, ab = (np.asarray(x) for x in SPACE.decode(SPACE.seed()))
    lo, hi = SPACE.groups[0]
    with pytest.raises(ValueError, match=rf"timestep {hi + 1} is outside its group 0: \[{lo}, {hi}\]"):
        SPACE.encode(np.r_[ts[:-1], hi + 1], wb, ab)
    with pytest.raises(ValueError, match=r"w_bits must be 7 values among \[8, 7, 6, 5\], got shape \(7,\) with "
                                         r"values \[4, 6\]"):
        SPACE.encode(ts, np.r_[wb[:-1], 4], ab)
    with pytest.raises(ValueError, match="3 timesteps for N=10"):
        SPACE.encode(ts[:3], wb, ab)
