"""The search driver on a cheap stand-in sampler (no UNet): distinct populations, the cache, successive halving,
resume and the resume fingerprint."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from tmpq_jax import quant
from tmpq_jax.search import Budget, EvolutionSearch, SearchSpace
from tmpq_jax.search.driver import ConfigChangedError, SearchSettings, decode_np, evolve, genome_key
from tmpq_jax.search.fitness import Evaluator, NoiseSet

SPACE = SearchSpace.create(4, 6)
SITES = quant.SiteTable(tuple(quant.Site(f"site{i}", "conv", 100 * (i + 1), 1) for i in range(6)))
BUDGET = Budget.create(SITES, SPACE)


@dataclasses.dataclass
class FakeEvaluator(Evaluator):
    """The real cache and scoring logic; `sample` returns one number per candidate and sample instead of images."""

    sample_calls: list = dataclasses.field(default_factory=list)
    fail_at: int = -1

    def __post_init__(self):
        pass

    def sample(self, ts, wb, ab, noise_set):
        self.sample_calls.append((len(ts), noise_set.n))
        if len(self.sample_calls) == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        self.sampled += len(ts)
        value = np.asarray(ts).sum(-1) * 1e-3 + (np.asarray(wb) * np.asarray(ab)).sum(-1) * 1e-2
        noise = np.random.default_rng(noise_set.n).normal(size=noise_set.n) * 0.05
        return value[:, None] + noise[None, :]


@dataclasses.dataclass
class MeanMetric:
    name: str = "mean"
    paired: bool = False

    def __call__(self, images, teacher=None):
        v = float(np.mean(images))
        return float("nan") if round(v * 1e3) % 7 == 0 else v  # a fixed subset of candidates "breaks"


def fake_evaluator(**kw):
    return FakeEvaluator(None, SITES, None, None, (1,), 0, strategy="loop", **kw)


def run(tmp_path, evaluator, generations=5, resume=False, fidelity=(8,), fingerprint=None, pop=8):
    algo = EvolutionSearch(SPACE, pop, 3, 3, 2)
    settings = SearchSettings(0, fidelity, 0.5, 8, 0)
    return evolve("joint", algo, SPACE, BUDGET, evaluator, MeanMetric(), settings, generations, tmp_path,
                  fingerprint or {"a": 1}, resume)


def keys_of(result, gen):
    return [genome_key(jax.tree.map(lambda x: x[gen, i], result.log["genomes"]))
            for i in range(result.log["genomes"].timestep_idx.shape[1])]


def test_populations_have_no_duplicates_and_never_repeat_earlier_generations(tmp_path):
    result = run(tmp_path, fake_evaluator(), generations=6)
    seen = set()
    for gen in range(6):
        keys = keys_of(result, gen)
        assert len(set(keys)) == len(keys), f"duplicate genome in generation {gen}"
        assert not seen & set(keys), f"generation {gen} repeats an earlier genome"
        assert result.log["new"][gen].all()
        seen |= set(keys)
    assert all(h["new"] == 8 for h in result.history)


def test_each_distinct_candidate_is_sampled_once(tmp_path):
    ev = fake_evaluator()
    result = run(tmp_path, ev, generations=4)
    assert ev.sampled == int(result.log["feasible"].sum())  # all distinct, so every feasible one once
    # scoring the same candidates again hits the cache
    ts, wb, ab = decode_np(SPACE, jax.tree.map(lambda x: x[0], result.log["genomes"]))
    before = ev.sampled
    again = ev.evaluate(ts, wb, ab, NoiseSet(0, "fitness", 8), [MeanMetric()])
    assert ev.sampled == before
    np.testing.assert_array_equal(again[:, 0], result.log["scores"][0, :, 0])


def test_successive_halving_scores_the_best_half_at_full_fidelity(tmp_path):
    ev = fake_evaluator()
    result = run(tmp_path, ev, generations=3, fidelity=(4, 16))
    for gen in range(3):
        low = result.log["scores"][gen, :, 0]
        full = result.log["level"][gen] == 1
        n_low = int((result.log["level"][gen] >= 0).sum())
        assert full.sum() == min(int(np.ceil(n_low * 0.5)), int(np.isfinite(low).sum()))
        # those promoted are the best at the low fidelity
        promoted, rest = low[full], low[(result.log["level"][gen] == 0) & np.isfinite(low)]
        assert rest.size == 0 or promoted.max() <= rest.min()
        # rank: full-fidelity candidates first
        rank = result.log["rank"][gen]
        fin = np.isfinite(rank)
        assert rank[full & fin].max() < rank[~full & fin].min()
    assert {n for _, n in ev.sample_calls} == {4, 16}


def test_interrupted_search_resumes_to_the_same_result(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = run(tmp_path / "a", fake_evaluator())
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", fake_evaluator(fail_at=3))
    ev = fake_evaluator()
    resumed = run(tmp_path / "b", ev, resume=True)
    assert len(ev.sample_calls) == 3  # generations 0 and 1 were not redone
    np.testing.assert_array_equal(resumed.log["scores"], straight.log["scores"])
    for a, b in zip(jax.tree.leaves(resumed.log["genomes"]), jax.tree.leaves(straight.log["genomes"])):
        np.testing.assert_array_equal(a, b)
    assert [h["best"] for h in resumed.history] == [h["best"] for h in straight.history]
    assert np.isnan(straight.log["scores"]).any()  # broken candidates ...
    assert np.isinf(straight.log["rank"][straight.log["feasible"]]).any()  # ... ranked as infeasible


def test_resume_under_a_changed_config_names_the_fields(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, fake_evaluator(fail_at=2), fingerprint={"search_samples": 40, "metric": "x", "seed": 0})
    with pytest.raises(ConfigChangedError, match=r"search_samples: checkpoint 40 vs now 16.*seed: checkpoint 0 vs "
                                                 r"now 1"):
        run(tmp_path, fake_evaluator(), resume=True, fingerprint={"search_samples": 16, "metric": "x", "seed": 1})
    assert json.loads((tmp_path / "search_joint.json").read_text())["search_samples"] == 40


def test_top_unique_has_no_duplicates(tmp_path):
    result = run(tmp_path, fake_evaluator(), generations=4)
    top = result.top_unique(6)
    assert len({genome_key(g) for g, _ in top}) == len(top) == 6
    fits = [f for _, f in top]
    assert fits == sorted(fits)


def test_budget_below_the_seed_cost_skips_timestep_only_and_keeps_precision_only_in_its_space(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "configs"))
    import tiny

    from tmpq_jax.search import run as run_mod

    c = tiny.get_config()
    c.generations, c.population_size, c.num_parents, c.num_mutation, c.num_crossover = 2, 6, 2, 2, 1
    c.search_samples, c.baselines, c.warm_start = 8, ("timestep_only", "precision_only"), True
    tight = Budget.create(SITES, SPACE, limit=BUDGET.cost_of(SPACE.uniform_bits(5)) + 50)  # below W6A6, the seed
    problem = run_mod.Problem(None, None, None, SITES, SPACE, tight, "sha")
    searches = run_mod.run_searches(c, problem, fake_evaluator(), MeanMetric(), tmp_path, resume=False)
    assert set(searches) == {"precision_only", "joint"}  # timestep-only cannot change bits: skipped
    p = searches["precision_only"]
    assert (p.log["genomes"].timestep_idx == 0).all()  # never changes timesteps
    assert p.log["bitops"][p.log["feasible"]].max() <= tight.limit
    final = run_mod.baseline_finalists(c, problem, fake_evaluator(), MeanMetric(), searches)
    assert final["timestep_only"] is None and final["precision_only"] is not None


def test_candidates_stopped_at_a_low_fidelity_rank_by_their_score_there():
    """Successive halving used to tell score + 1e12 per missing level in float32, where steps are 65,536 apart:
    every candidate that stopped early tied, and the parents among them were picked by position."""
    from tmpq_jax.search.driver import generation_ranks, rank_keys

    scores = np.array([[0.04, np.nan], [0.01, np.nan], [0.005, 0.5], [0.03, np.nan], [0.002, 0.4], [0.02, np.nan],
                       [np.nan, np.nan]])
    level = np.array([0, 0, 1, 0, 1, 0, -1])
    keys = rank_keys(scores, level)
    np.testing.assert_array_equal(keys[:, 0], [1, 1, 0, 1, 0, 1, 2])
    np.testing.assert_array_equal(generation_ranks(keys), [5, 2, 1, 4, 0, 3, np.inf])
    # the algorithm keeps the two full-fidelity candidates, then the two best low-fidelity ones by their score
    algo = EvolutionSearch(SPACE, 7, 4, 2, 1)
    pop, state = algo.ask(jax.random.key(0), algo.init(jax.random.key(0)))
    state = algo.tell(jax.random.key(0), pop, jax.numpy.asarray(keys), state)
    np.testing.assert_allclose(np.asarray(state.top_fitness), [0.4, 0.5, 0.01, 0.02], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.top_primary), [0, 0, 1, 1])


@dataclasses.dataclass
class SelectFavours(FakeEvaluator):
    """As FakeEvaluator, but on the select noise a candidate with every weight at `favoured_w` bits scores
    `favoured_score` (e.g. an incumbent that the fitness samples under-rate)."""

    favoured_w: int = 5
    favoured_score: float = -1.0

    def sample(self, ts, wb, ab, noise_set):
        out = super().sample(ts, wb, ab, noise_set)
        if noise_set.purpose == "select":
            out[(np.asarray(wb) == self.favoured_w).all(-1)] = self.favoured_score
        return out


@pytest.mark.parametrize("favoured_score, incumbent_wins", [(-1.0, True), (10.0, False)])
def test_rescore_returns_the_incumbent_only_when_it_wins_on_the_select_noise(tmp_path, favoured_score,
                                                                             incumbent_wins):
    import ml_collections

    from tmpq_jax.search import run as run_mod

    result = run(tmp_path, fake_evaluator(), generations=3)
    c = ml_collections.ConfigDict(dict(rescore_top_k=2, noise_seed=0, search_samples=8, select_samples=16,
                                       report_noise_seed=1, final_samples=4))
    incumbent = run_mod.Finalist(jax.tree.map(np.asarray, SPACE.uniform_bits(5)), SPACE, 0.9, None, "greedy")
    top_keys = {genome_key(g) for g, _ in result.top_unique(2)}
    assert genome_key(incumbent.genome) not in top_keys  # the fitness did not keep it
    ev = SelectFavours(None, SITES, None, None, (1,), 0, strategy="loop", favoured_score=favoured_score)
    alone = run_mod.rescore(c, ev, MeanMetric(), result)
    guarded = run_mod.rescore(c, ev, MeanMetric(), result, [incumbent])
    assert genome_key(alone.genome) in top_keys and "incumbent" not in alone.note
    if incumbent_wins:
        assert genome_key(guarded.genome) == genome_key(incumbent.genome)
        assert guarded.fitness == 0.9 and guarded.selection == pytest.approx(-1.0)
        assert "an incumbent won" in guarded.note
    else:
        assert genome_key(guarded.genome) == genome_key(alone.genome) and guarded.selection == alone.selection
        assert guarded.note.endswith("and 1 incumbent(s)")


def test_warm_starts_within_the_budget_enter_as_given_and_are_not_refined():
    from tmpq_jax.search.driver import propose

    algo = EvolutionSearch(SPACE, 6, 3, 3, 2)
    ask = jax.jit(algo.ask)
    key = jax.random.key(0)
    state = algo.init(key)
    cheap = jax.tree.map(np.asarray, SPACE.uniform_bits(5))  # under the budget (W6A6): a refine would raise it
    costly = jax.tree.map(np.asarray, SPACE.uniform_bits(8))  # over it: repaired as before
    assert BUDGET.is_feasible(cheap) and not BUDGET.is_feasible(costly)

    def raise_first_site(pop):  # a stand-in for the knapsack fill: changes every genome it gets
        w = np.array(pop.w_bit_idx, copy=True)
        w[:, 0] = np.maximum(w[:, 0] - 1, 0)
        return pop.replace(w_bit_idx=w)

    pop, _, cost, feasible, _ = propose(ask, key, state, SPACE, BUDGET, set(), 4, [costly, cheap], raise_first_site)
    last = jax.tree.map(lambda x: x[-1], pop)
    assert genome_key(last) == genome_key(cheap) and cost[-1] == BUDGET.cost_of(cheap) and feasible[-1]
    second = jax.tree.map(lambda x: x[-2], pop)
    assert genome_key(second) != genome_key(costly) and cost[-2] == BUDGET.cost_of(second)
    assert (cost == BUDGET.cost_of(pop)).all()


@dataclasses.dataclass
class SelectReverses(FakeEvaluator):
    """As FakeEvaluator, but the select noise ranks candidates in the reverse order of the fitness noise."""

    def sample(self, ts, wb, ab, noise_set):
        out = super().sample(ts, wb, ab, noise_set)
        return -out if noise_set.purpose == "select" else out


@pytest.mark.parametrize("evaluator_cls, picks_fitness_best", [(FakeEvaluator, True), (SelectReverses, False)])
def test_greedy_finalist_picks_its_variant_on_the_select_noise(evaluator_cls, picks_fitness_best):
    import ml_collections

    from tmpq_jax.search import run as run_mod

    c = ml_collections.ConfigDict(dict(noise_seed=0, search_samples=8, select_samples=16, report_noise_seed=1,
                                       final_samples=4))
    problem = run_mod.Problem(None, None, None, SITES, SPACE, BUDGET, "")
    ev = evaluator_cls(None, SITES, None, None, (1,), 0, strategy="loop")
    f = run_mod.greedy_finalist(c, problem, ev, MeanMetric())
    variants = [BUDGET.greedy_bits(SPACE, a) for a in (None, SPACE.bit_choices[-2])]
    assert genome_key(variants[0]) != genome_key(variants[1])
    fit = [ev.evaluate(*decode_np(SPACE, jax.tree.map(lambda x: x[None], g)), run_mod.noise_sets(c)["fitness"],
                       [MeanMetric()])[0, 0] for g in variants]
    chosen = int(np.argmin(fit)) if picks_fitness_best else int(np.argmax(fit))
    assert genome_key(f.genome) == genome_key(variants[chosen])
    assert f.fitness == pytest.approx(fit[chosen]) and f.selection is not None
    assert "select noise" in f.note
    assert [n for _, n in ev.sample_calls] == [8, 16]  # both variants once on each noise, nothing re-sampled


@dataclasses.dataclass
class NegMeanMetric(MeanMetric):
    """Ranks candidates in the reverse order of MeanMetric (a select metric that disagrees with the fitness)."""

    name: str = "neg_mean"

    def __call__(self, images, teacher=None):
        return -float(np.mean(images))


def test_greedy_finalist_chooses_by_the_select_metric():
    import ml_collections

    from tmpq_jax.search import run as run_mod

    c = ml_collections.ConfigDict(dict(noise_seed=0, search_samples=8, select_samples=16, report_noise_seed=1,
                                       final_samples=4))
    problem = run_mod.Problem(None, None, None, SITES, SPACE, BUDGET, "")
    ev = FakeEvaluator(None, SITES, None, None, (1,), 0, strategy="loop")
    by_fitness = run_mod.greedy_finalist(c, problem, ev, MeanMetric())
    by_select = run_mod.greedy_finalist(c, problem, ev, MeanMetric(), NegMeanMetric())
    assert genome_key(by_fitness.genome) != genome_key(by_select.genome)
    sel = ev.evaluate(*decode_np(SPACE, jax.tree.map(lambda x: x[None], by_select.genome)),
                      run_mod.noise_sets(c)["select"], [NegMeanMetric()])[0, 0]
    assert by_select.selection == pytest.approx(sel) and "by neg_mean" in by_select.note


@pytest.mark.parametrize("select_metric, expected", [("", "teacher_mse"), ("teacher_mse", "teacher_mse"),
                                                     ("teacher_classifier", "teacher_classifier")])
def test_select_metric_defaults_to_the_fitness(select_metric, expected):
    import ml_collections

    from tmpq_jax.search import run as run_mod

    c = ml_collections.ConfigDict(dict(metric="teacher_mse", select_metric=select_metric))
    assert run_mod.select_metric_name(c) == expected


def test_unknown_select_metric_is_refused_by_name():
    from experiments.configs import tiny

    from tmpq_jax.search import run as run_mod

    c = tiny.get_config()
    c.select_metric = "fid_of_dreams"
    with pytest.raises(ValueError, match="select_metric='fid_of_dreams'.*valid"):
        run_mod.validate_config(c)


@pytest.mark.parametrize("evaluator_cls, picks_fitness_best", [(FakeEvaluator, True), (SelectReverses, False)])
def test_knapsack_finalist_is_the_best_optimum_on_the_select_noise(evaluator_cls, picks_fitness_best):
    """The `knapsack` baseline: each optimum scored once on each noise; the select noise picks (here it agrees
    with the fitness noise, or reverses it)."""
    import ml_collections

    from tmpq_jax.search import run as run_mod

    c = ml_collections.ConfigDict(dict(noise_seed=0, search_samples=8, select_samples=16, report_noise_seed=1,
                                       final_samples=4, knapsack_weights=(0.25, 0.5, 0.75)))
    problem = run_mod.Problem(None, None, None, SITES, SPACE, BUDGET, "")
    ev = evaluator_cls(None, SITES, None, None, (1,), 0, strategy="loop")
    optima = [jax.tree.map(np.asarray, SPACE.uniform_bits(b)) for b in (5, 6)] + [BUDGET.greedy_bits(SPACE)]
    f = run_mod.knapsack_finalist(c, problem, ev, MeanMetric(), optima)
    fit = [ev.evaluate(*decode_np(SPACE, jax.tree.map(lambda x: np.asarray(x)[None], g)),
                       run_mod.noise_sets(c)["fitness"], [MeanMetric()])[0, 0] for g in optima]
    assert len(set(np.round(fit, 9))) == 3  # three distinct fitnesses: the pick is meaningful
    chosen = int(np.argmin(fit)) if picks_fitness_best else int(np.argmax(fit))
    assert genome_key(f.genome) == genome_key(optima[chosen])
    assert f.fitness == pytest.approx(fit[chosen])
    assert f"weights' share {c.knapsack_weights[chosen]}" in f.note and "select noise" in f.note
    assert [n for _, n in ev.sample_calls][:2] == [8, 16]  # all optima in one call per noise set
    assert run_mod.knapsack_finalist(c, problem, ev, MeanMetric(), []) is None


@pytest.mark.parametrize("best_selection, larger_takes_best", [(-1e9, True), (1e9, False)])
def test_a_larger_budget_of_the_front_is_never_worse_than_a_smaller_ones_point(tmp_path, best_selection,
                                                                               larger_takes_best):
    """`front_finalists`: the 1.4x budget's point is `best` (the default budget's, e.g. a warm start outside the pool's
    top-k) when `best` wins on the select noise, else the pool's own candidate; the 0.97x point fits its budget."""
    import ml_collections

    from tmpq_jax.search import run as run_mod

    result = run(tmp_path, fake_evaluator(), generations=3)
    c = ml_collections.ConfigDict(dict(rescore_top_k=2, noise_seed=0, search_samples=8, select_samples=16,
                                       report_noise_seed=1, final_samples=4))
    small = Budget.create(SITES, SPACE, int(BUDGET.limit * 0.97))  # the pool holds a few candidates under it
    large = Budget.create(SITES, SPACE, int(BUDGET.limit * 1.4))
    problem = run_mod.Problem(None, None, None, SITES, SPACE, BUDGET, "", budgets=(small, BUDGET, large))
    cheap = jax.tree.map(np.asarray, SPACE.uniform_bits(5))  # not where the pool's top-k are
    best = run_mod.Finalist(cheap, SPACE, 0.5, best_selection, "warm start")
    ev = fake_evaluator()
    lo, mid, hi = run_mod.front_finalists(c, problem, ev, MeanMetric(), {"joint": result}, best)
    assert mid is best and small.is_feasible(lo.genome) and large.is_feasible(hi.genome)
    if larger_takes_best:
        assert genome_key(hi.genome) == genome_key(best.genome) and hi.selection == best_selection
        assert hi.note.startswith("the point of a smaller budget")
    else:
        assert genome_key(hi.genome) != genome_key(best.genome) and hi.note.startswith("best of")
        assert hi.selection < best_selection
