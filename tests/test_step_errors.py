"""One-step errors of quantized candidates from an FP run's states (`Evaluator.step_errors`, the `one_step`
sensitivities of `search.sensitivity`), on the tiny UNet."""

import numpy as np
import pytest


def evaluator(tiny, sample_batch=4):
    from tmpq_jax.search.fitness import Evaluator

    return Evaluator(tiny.apply, tiny.sites, tiny.params, tiny.tables, tiny.spec.sample_shape,
                     tiny.spec.num_classes, strategy="loop", sample_batch=sample_batch, schedule=tiny.spec.schedule)


def test_one_step_error_of_a_one_step_schedule_is_the_sample_error(tiny):
    """With one sampling step the step from the FP state (the noise) is the whole run: the error is the mean squared
    difference of the candidate's samples to the FP sampler's, per candidate."""
    from tmpq_jax.search.fitness import NoiseSet

    ev, L, noise = evaluator(tiny), len(tiny.sites), NoiseSet(5, "fitness", 6)
    ts = np.array([600])
    wb = np.stack([np.full(L, 4), np.full(L, 8), np.full(L, 2)])
    ab = np.stack([np.full(L, 8), np.full(L, 4), np.full(L, 8)])
    got = ev.step_errors(ts, wb, ab, noise)
    images = ev.sample(np.repeat(ts[None], 3, 0), wb, ab, noise)
    want = np.mean((images - ev.sample_fp(ts, noise)[None]) ** 2, axis=(1, 2, 3, 4))
    assert want.min() > 0.05  # every candidate is off the FP sampler (measured: 0.070, 0.132, 0.422)
    np.testing.assert_allclose(got, want, rtol=1e-5)  # measured: 1.2e-7 (float32 rounding)


def test_one_step_errors_vanish_at_full_precision_and_grow_as_bits_drop(tiny):
    """16 bits is a pass-through: every step is the FP step (0 up to float32 rounding); fewer bits, more error.
    Padded rows of the last batch (6 samples in batches of 4) are not counted: the same as one batch of 6."""
    from tmpq_jax.search.fitness import NoiseSet

    ev, L, noise = evaluator(tiny), len(tiny.sites), NoiseSet(5, "fitness", 6)
    ts = np.array([900, 500, 100])
    bits = np.array([16, 8, 6, 4])
    got = ev.step_errors(ts, np.repeat(bits[:, None], L, 1), np.repeat(bits[:, None], L, 1), noise)
    # measured: 0, 6.8e-4, 2.4e-3, 1.6e-2
    assert got[0] < 1e-10 and np.all(np.diff(got) > 0) and got[1] > 1e-4, got
    assert ev.sampled == 4  # one run's UNet passes per candidate
    whole = evaluator(tiny, sample_batch=6).step_errors(ts, np.full((1, L), 4), np.full((1, L), 4), noise)
    np.testing.assert_allclose(whole, got[3:], rtol=1e-5)  # measured: 1.2e-7


def test_one_step_errors_refuse_an_uncalibrated_bit_width(tiny):
    from tmpq_jax.search.fitness import NoiseSet

    L = len(tiny.sites)
    with pytest.raises(ValueError, match="3"):
        evaluator(tiny).step_errors(np.array([900, 100]), np.full((1, L), 3), np.full((1, L), 8),
                                    NoiseSet(0, "fitness", 2))


def test_site_sensitivities_by_one_step_error_are_probe_minus_all_top_and_cached(tiny, tmp_path):
    """run.site_sensitivities with sensitivity_metric='one_step': each measured damage is the probe's step error minus
    the all-top candidate's (recomputed here for two probes), every probe counts one run, and the table is cached
    under a key naming the score; a deviation-scored config does not load it."""
    import jax
    import ml_collections

    from tmpq_jax.search import run as run_mod
    from tmpq_jax.search import sensitivity
    from tmpq_jax.search.budget import Budget
    from tmpq_jax.search.fitness import NoiseSet
    from tmpq_jax.search.space import SearchSpace

    L = len(tiny.sites)
    space = SearchSpace.create(num_steps=3, num_sites=L, bit_choices=(8, 6, 4), seed_bits=6)
    budget = Budget.create(tiny.sites, space)
    problem = run_mod.Problem(tiny.spec, tiny.apply, tiny.params, tiny.sites, space, budget, "sha")
    c = ml_collections.ConfigDict(dict(noise_seed=0, sensitivity_samples=3, sensitivity_probe_bits=(4,),
                                       sensitivity_mac_share=0.5, sensitivity_metric="one_step", population_size=4))
    ev = evaluator(tiny)
    sens = run_mod.site_sensitivities(c, problem, ev, None, tmp_path)
    plist = sensitivity.probes(budget, (4,), 0.5)
    assert sens.runs == len(plist) + 1 == ev.sampled
    ts = np.asarray(space.timesteps(jax.tree.map(np.asarray, space.seed())))
    noise = NoiseSet(0, "fitness", 3)
    check = [plist[0], plist[-1]]  # a weight probe and an activation probe
    w = np.full((3, L), 8)
    a = np.full((3, L), 8)
    for k, p in enumerate(check):
        (w if p.operand == "w" else a)[k + 1, p.site] = 4
    s = evaluator(tiny).step_errors(ts, w, a, noise)
    for k, p in enumerate(check):
        table = sens.w_damage if p.operand == "w" else sens.a_damage
        assert table[p.site, p.bit_idx] == pytest.approx(s[k + 1] - s[0], rel=1e-5, abs=1e-9)
    assert '"one_step"' in str(np.load(tmp_path / "sensitivities.npz")["key"])
    again = evaluator(tiny)
    run_mod.site_sensitivities(c, problem, again, None, tmp_path)
    assert again.sampled == 0  # loaded from the cache
    c.sensitivity_metric = "deviation"
    other = evaluator(tiny)
    run_mod.site_sensitivities(c, problem, other, None, tmp_path)
    assert other.sampled == len(plist) + 1  # another score: measured again
