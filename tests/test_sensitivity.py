"""Per-site sensitivity probes and damage tables (no model)."""

import numpy as np
import pytest

from tmpq_jax.search import sensitivity as sens
from tmpq_jax.search.budget import Budget

BITS = (8, 7, 6, 5)
BUDGET = Budget(10**9, (10, 20, 30), (0, 8, 0), (0, 0, 0), BITS, 4)  # site 1's weights pinned by a rule


def test_probes_cover_every_searched_operand_and_no_pinned_one():
    p = sens.probes(BUDGET)
    assert len(p) == (2 + 3) * 3  # 2 searched weight operands and 3 activation ones, 3 lower choices each
    assert not any(q.site == 1 and q.operand == "w" for q in p)
    w, a = sens.probe_bits_arrays(BUDGET, p)
    assert np.all((w > 0).sum(1) + (a > 0).sum(1) == 1)  # exactly one operand lowered per probe
    assert len(sens.probes(BUDGET, probe_bits=(5,))) == 5


@pytest.mark.parametrize("probe_bits,match", [((8,), "lower bit choices"), ((4,), "lower"), ((), "non-empty")])
def test_bad_probe_bits_are_refused(probe_bits, match):
    with pytest.raises(ValueError, match=match):
        sens.probes(BUDGET, probe_bits)


def true_damage(site, operand, b):
    k = {("w", 0): 1.0, ("w", 2): 3.0, ("a", 0): 2.0, ("a", 1): 0.5, ("a", 2): 7.0}[(operand, site)]
    return k * (4.0 ** -b - 4.0 ** -8) * 1e4


@pytest.mark.parametrize("probe_bits", [None, (5,), (6, 5)])
def test_damage_tables_recover_a_noise_power_model(probe_bits):
    p = sens.probes(BUDGET, probe_bits)
    base = 0.25
    scores = [base + true_damage(q.site, q.operand, BITS[q.bit_idx]) for q in p]
    dw, da = sens.damage_tables(BUDGET, p, scores, base)
    want_w = np.array([[true_damage(s, "w", b) if (s != 1) else 0.0 for b in BITS] for s in range(3)])
    want_a = np.array([[true_damage(s, "a", b) for b in BITS] for s in range(3)])
    np.testing.assert_allclose(dw, want_w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(da, want_a, rtol=1e-12, atol=1e-12)


def test_non_finite_probe_scores_are_errors_that_name_the_probe():
    p = sens.probes(BUDGET, (5,))
    scores = np.ones(len(p))
    scores[2] = np.nan
    with pytest.raises(ValueError, match=f"site {p[2].site} {p[2].operand} at 5 bits"):
        sens.damage_tables(BUDGET, p, scores, 0.5)
    with pytest.raises(ValueError, match="all-top"):
        sens.damage_tables(BUDGET, p, np.ones(len(p)), np.nan)


@pytest.mark.parametrize("macs, share, want", [
    ((10, 20, 30), 1.0, [True, True, True]),
    ((10, 20, 30), 0.5, [False, False, True]),  # 30 of 60 is exactly half
    ((10, 20, 30), 0.51, [False, True, True]),
    ((10, 20, 30), 0.01, [False, False, True]),
    ((5, 5, 5, 85), 0.9, [True, False, False, True]),  # ties: site order
])
def test_probed_sites_are_the_largest_by_macs(macs, share, want):
    b = Budget(10**9, macs, (0,) * len(macs), (0,) * len(macs), BITS, 4)
    assert sens.probed_sites(b, share).tolist() == want


@pytest.mark.parametrize("share", [0.0, 1.5, -1.0])
def test_bad_mac_share_is_refused(share):
    with pytest.raises(ValueError, match=r"mac_share=.* must be in \(0, 1\]"):
        sens.probed_sites(BUDGET, share)


def test_unprobed_sites_get_the_median_damage_per_mac():
    b = Budget(10**9, (10, 20, 30, 40), (0, 0, 0, 0), (0, 0, 0, 0), BITS, 4)
    p = sens.probes(b, (5,), mac_share=0.7)  # sites 3 and 2 (70 of 100 MACs)
    assert sorted({q.site for q in p}) == [2, 3] and len(p) == 4
    per_mac = {("w", 2): 1.0, ("w", 3): 3.0, ("a", 2): 2.0, ("a", 3): 2.0}
    scores = [1.0 + per_mac[(q.operand, q.site)] * b.macs[q.site] * (4.0 ** -5 - 4.0 ** -8) for q in p]
    dw, da = sens.damage_tables(b, p, scores, 1.0)
    noise = 4.0 ** -np.asarray(BITS, np.float64) - 4.0 ** -8
    for site, m in ((0, 10), (1, 20)):  # median of (1, 3) = 2 per MAC for weights; 2 for activations
        np.testing.assert_allclose(dw[site], 2.0 * m * noise, rtol=1e-12)
        np.testing.assert_allclose(da[site], 2.0 * m * noise, rtol=1e-12)
    np.testing.assert_allclose(dw[3], 3.0 * 40 * noise, rtol=1e-12)  # probed sites keep their own damage


@pytest.mark.parametrize("probe_images, want", [
    ([[[0.0, 0.0], [1.0, 1.0]]], [0.0]),                    # the all-top images themselves: no deviation
    ([[[1.0, 0.0], [1.0, 1.0]]], [0.25]),                   # one of four pixels off by 1
    ([[[0.0, 0.0], [1.0, 1.0]], [[-1.0, 0.0], [1.0, 3.0]]], [0.0, 1.25]),  # (1 + 4) / 4, per probe
])
def test_deviation_scores_are_mean_squared_differences_to_the_all_top_images(probe_images, want):
    top = np.array([[0.0, 0.0], [1.0, 1.0]])  # n = 2 samples of 2 pixels
    np.testing.assert_allclose(sens.deviation_scores(top, np.array(probe_images)), want)


def test_deviation_scores_refuse_images_of_another_shape():
    with pytest.raises(ValueError, match=r"probe images \(1, 3, 2\) do not match the all-top images \(2, 2\)"):
        sens.deviation_scores(np.zeros((2, 2)), np.zeros((1, 3, 2)))


def test_noise_model_tables_are_macs_times_extra_noise_power_and_zero_where_pinned():
    dw, da = sens.noise_model_tables(BUDGET)
    extra = np.array([0.0, 4.0 ** -7 - 4.0 ** -8, 4.0 ** -6 - 4.0 ** -8, 4.0 ** -5 - 4.0 ** -8])
    np.testing.assert_allclose(da, np.outer([10, 20, 30], extra), rtol=1e-12)
    np.testing.assert_allclose(dw, np.outer([10, 0, 30], extra), rtol=1e-12)  # site 1's weights pinned
    # the 4^-b model it assumes: each bit less quadruples the extra noise (to within the top's own 4^-8)
    assert da[2, 3] / da[2, 2] == pytest.approx(4.0 * (1 - 4.0 ** -3) / (1 - 4.0 ** -2), rel=1e-12)


def test_noise_model_sensitivities_spend_no_sampler_runs(tmp_path):
    from types import SimpleNamespace

    from ml_collections import ConfigDict

    from tmpq_jax.search import run

    c = ConfigDict(dict(noise_seed=3, sensitivity_samples=8, sensitivity_metric="noise_model"))
    s = run.site_sensitivities(c, SimpleNamespace(budget=BUDGET, space=None), None, None, tmp_path)  # no evaluator
    assert s.runs == 0 and not list(tmp_path.iterdir())  # nothing sampled, nothing cached
    want = sens.noise_model_tables(BUDGET)
    np.testing.assert_array_equal(s.w_damage, want[0])
    np.testing.assert_array_equal(s.a_damage, want[1])
