"""The timestep dynamic program: the chain itself without a model, its costs and glue on the tiny UNet."""

import itertools

import jax
import numpy as np
import pytest

from tmpq_jax.search import timestep_dp as tdp
from tmpq_jax.search.space import SearchSpace


@pytest.mark.parametrize("seed", range(6))
def test_chain_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, 4)
    start = rng.random(sizes[0])
    trans = [rng.random((sizes[j], sizes[j + 1])) for j in range(3)]
    final = rng.random(sizes[-1])
    path, total = tdp.chain_dp(start, trans, final)
    best = min((start[p[0]] + sum(trans[j][p[j], p[j + 1]] for j in range(3)) + final[p[-1]], p)
               for p in itertools.product(*(range(s) for s in sizes)))
    assert total == pytest.approx(best[0], abs=1e-12) and tuple(path) == best[1]
    assert len(path) == 4 and all(0 <= k < s for k, s in zip(path, sizes))  # one option per group


def test_candidate_offsets_hold_the_seed_and_stay_inside_each_group():
    space = SearchSpace.create(num_steps=10, num_sites=1)
    offs = tdp.candidate_offsets(space, 8)
    assert len(offs) == 10
    for o, n in zip(offs, space.group_sizes):
        assert o[0] == 0 and o[-1] == n - 1 and len(o) == min(8, n) and np.all(np.diff(o) > 0)
    with pytest.raises(ValueError, match="per_group must be an integer >= 1, got 0"):
        tdp.candidate_offsets(space, 0)


def test_chain_dp_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="transition 0 has 3 sources"):
        tdp.chain_dp(np.zeros(2), [np.zeros((3, 2))], np.zeros(2))


def test_quantized_step_costs_vanish_along_the_teacher_at_full_precision(tiny):
    """At 16 bits (pass-through) the step from the last candidate of a group to the first of the next is a step of
    the fine teacher itself: zero error; steps that skip fine timesteps are not. At 4 bits no step is exact."""
    from tmpq_jax import sampling

    groups = [np.array([900, 700]), np.array([500, 400, 300]), np.array([100, 20])]
    L = len(tiny.sites)
    kw = tiny.spec.schedule.sampler_kwargs()

    def costs(bits):
        return sampling.quantized_step_costs(tiny.apply, tiny.sites, tiny.abar, tiny.params, tiny.tables,
                                             np.full(L, bits), np.full(L, bits), groups, tiny.noise, tiny.labels, kw)

    start, trans, final = costs(16)
    assert start.tolist() == [0.0, 0.0] and [t.shape for t in trans] == [(2, 3), (3, 2)] and final.shape == (2,)
    # measured: 0 up to float32 rounding; skipping steps costs more
    assert trans[1][2, 0] < 1e-10 and final[1] < 1e-10  # 300 -> 100 and 20 -> the end are the teacher's steps
    # every other step skips fine timesteps; the first group's sources start from the noise (as the sampler does),
    # so none of them is the teacher's step 900 -> 700
    skipping = np.concatenate([trans[0].ravel(), np.delete(trans[1].ravel(), 4), final[:1]])
    assert skipping.min() > 5e-6  # measured: 1.5e-5 (100 -> the end, skipping 20) and up
    _, q_trans, q_final = costs(4)
    assert q_trans[1][2, 0] > 1e-6 and q_final[1] > 1e-6


def test_dp_timesteps_returns_one_step_per_group_and_keeps_the_bits(tiny):
    """run.dp_timesteps on the tiny UNet: a genome of the space with new offsets, its bits unchanged."""
    import ml_collections

    from tmpq_jax.search import run as run_mod
    from tmpq_jax.search.budget import Budget
    from tmpq_jax.search.fitness import Evaluator

    L = len(tiny.sites)
    space = SearchSpace.create(num_steps=3, num_sites=L, bit_choices=(8, 6, 4, 2), seed_bits=6)
    problem = run_mod.Problem(tiny.spec, tiny.apply, tiny.params, tiny.sites, space,
                              Budget.create(tiny.sites, space), "sha")
    ev = Evaluator(tiny.apply, tiny.sites, tiny.params, tiny.tables, tiny.spec.sample_shape, tiny.spec.num_classes,
                   strategy="loop", schedule=tiny.spec.schedule)
    c = ml_collections.ConfigDict(dict(dp_per_group=4, dp_samples=2, noise_seed=0))
    g = run_mod.dp_timesteps(c, problem, ev, jax.tree.map(np.asarray, space.seed()))
    idx = np.asarray(g.timestep_idx)
    assert idx.shape == (3,) and np.all((idx >= 0) & (idx < space.group_sizes))
    allowed = tdp.candidate_offsets(space, 4)
    assert all(i in a for i, a in zip(idx, allowed))
    np.testing.assert_array_equal(g.w_bit_idx, space.seed().w_bit_idx)
    assert ev.sampled == 0  # one-step errors only: no candidate sampling run


def test_evaluator_compiles_once_for_every_noise_set_size_and_keeps_each_row(tiny):
    """sample_batch=4: noise sets of 4, 6 and 10 rows run in batches of 4 (the last padded), so the sampler traces
    once; every row equals the same row sampled in one batch of its own size, up to float rounding of the batch."""
    from tmpq_jax.search.fitness import Evaluator, NoiseSet

    traces = []

    def counting_apply(params, x, t, y):
        traces.append(x.shape)
        return tiny.apply(params, x, t, y)

    kw = dict(strategy="loop", schedule=tiny.spec.schedule)
    ev = Evaluator(counting_apply, tiny.sites, tiny.params, tiny.tables, tiny.spec.sample_shape,
                   tiny.spec.num_classes, sample_batch=4, **kw)
    L = len(tiny.sites)
    ts, wb, ab = np.array([[900, 500, 100]]), np.full((1, L), 16), np.full((1, L), 16)
    got = {n: ev.sample(ts, wb, ab, NoiseSet(3, "fitness", n)) for n in (4, 6, 10)}
    assert {s[0] for s in traces} == {4} and len(traces) == 1  # one trace (the scan traces its body once)
    assert [g.shape[1] for g in got.values()] == [4, 6, 10]
    whole = Evaluator(tiny.apply, tiny.sites, tiny.params, tiny.tables, tiny.spec.sample_shape,
                      tiny.spec.num_classes, sample_batch=10, **kw).sample(ts, wb, ab, NoiseSet(3, "fitness", 10))
    np.testing.assert_allclose(got[10], whole, atol=1e-4)  # measured: 4e-5 (batch 4 vs 10, float rounding)
    np.testing.assert_array_equal(got[6], got[10][:, :6])  # same noise rows, same batches: bit for bit
    fp = ev.sample_fp(np.array([900, 500, 100]), NoiseSet(3, "fitness", 10))
    np.testing.assert_allclose(fp, whole[0], atol=1e-4)  # 16 bits = pass-through: the FP sampler's images
