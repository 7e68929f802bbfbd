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
