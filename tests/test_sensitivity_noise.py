"""experiments/sensitivity_noise.py: the seeds' agreement on measured damage entries and the damage's bit scaling,
on synthetic tables (no model)."""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import sensitivity_noise as sn  # noqa: E402

from tmpq_jax.search.budget import Budget  # noqa: E402


def test_measured_entries_mark_the_probed_sites_at_the_probed_bits():
    budget = Budget(limit=10 ** 9, macs=(100, 10, 1000, 50), fixed_w=(8, 0, 0, 0), fixed_a=(0, 0, 0, 0),
                    bit_choices=(8, 7, 6, 5), num_steps=1)
    c = type("C", (), dict(sensitivity_probe_bits=(5, 6), sensitivity_mac_share=0.9))
    mw, ma = sn.measured_entries(c, budget)
    # 90% of the MACs: sites 2 and 0 (1000 + 100 of 1160); site 0's weights are pinned (never probed)
    assert ma.tolist() == [[False, False, True, True], [False] * 4, [False, False, True, True], [False] * 4]
    assert mw.tolist() == [[False] * 4, [False] * 4, [False, False, True, True], [False] * 4]


@pytest.mark.parametrize("tables, mask, want", [
    # the measured entries rank alike in both seeds; the modeled zeros are left out by the mask
    ([np.array([1.0, 2.0, 3.0, 0.5]), np.array([10.0, 20.0, 30.0, 0.1])], [True, True, True, False], 1.0),
    ([np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])], [True, True, True], -1.0),
    # without a mask: every entry non-zero in some seed (here all four)
    ([np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 4.0, 3.0])], None, 0.8),
])
def test_rank_agreement_is_spearman_of_the_masked_entries(tables, mask, want):
    got = sn.rank_agreement(tables, None if mask is None else np.array(mask))
    assert got == {"0-1": pytest.approx(want)}


def test_bit_scaling_reports_measured_ratios_next_to_the_noise_model():
    # (sites, choices 8 7 6 5); 5 and 6 bits measured at sites 0-2, site 2's 5-bit damage non-positive (no ratio)
    t = np.array([[0, 0, 1.0, 4.0], [0, 0, 2.0, 4.0], [0, 0, 1.0, -1.0], [0, 0, 9.0, 9.0]])
    m = np.zeros((4, 4), bool)
    m[:3, 2:] = True
    out = sn.bit_scaling([t, 2 * t], m, (8, 7, 6, 5))
    assert list(out) == ["6_over_5"]
    assert out["6_over_5"]["n"] == 4 and out["6_over_5"]["quartiles"][1] == pytest.approx(0.375)
    assert out["6_over_5"]["model"] == pytest.approx((4.0 ** -6 - 4.0 ** -8) / (4.0 ** -5 - 4.0 ** -8))
