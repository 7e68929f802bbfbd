"""experiments/search_benchmark.py's accounting without a model: probes never become a method's winner."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tmpq_jax.search.ledger import BudgetExceeded, RunLedger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import search_benchmark as sb  # noqa: E402


@pytest.mark.parametrize("runs_out", [True, False])
def test_sensitivity_probes_are_not_candidates_of_the_method(monkeypatch, runs_out):
    ledger = RunLedger(limit=3, unit_samples=8)
    m = SimpleNamespace(c=SimpleNamespace(sensitivity_samples=8), problem=SimpleNamespace(space=None, budget=None),
                        ev=None, metric=None, workdir=None, ledger=ledger, candidates={}, incumbents=[])

    def probes(*args):  # as site_sensitivities when the probes share the fitness noise: each probe is recorded
        for i in range(4):
            ledger.charge(1, 8, "probe")
            ledger.record(f"probe{i}".encode(), 0.1 * i)

    def after(*args):
        raise RuntimeError("reached the knapsack")

    monkeypatch.setattr(sb.run_mod, "site_sensitivities", probes if runs_out else
                        lambda *a: ledger.record(b"p", 0.0) or SimpleNamespace(runs=0))
    monkeypatch.setattr(sb.run_mod, "knapsack_start", after)
    with pytest.raises(BudgetExceeded if runs_out else RuntimeError):
        sb.run_method("knapsack", m)
    assert ledger.records == []
    assert sb.winner(m) is None


@pytest.mark.parametrize("charged_by_probes, expected_spent", [(False, 41.0), (True, 3.0)])
def test_cached_sensitivities_are_charged_as_if_sampled(monkeypatch, charged_by_probes, expected_spent):
    """Sensitivities loaded from the workdir cost the method their probes' runs (82 candidates at 8 of 16 samples:
    41 runs), so a method with a warm cache gets no free runs; probes that sampled are charged once."""
    ledger = RunLedger(limit=150, unit_samples=16)
    m = SimpleNamespace(c=SimpleNamespace(sensitivity_samples=8), problem=SimpleNamespace(space=None, budget=None),
                        ev=None, metric=None, workdir=None, ledger=ledger, candidates={}, incumbents=[])

    def sensitivities(*args):
        if charged_by_probes:
            ledger.charge(6, 8, "probe")
        return SimpleNamespace(runs=82)

    def after(*args):
        raise RuntimeError("reached the knapsack")

    monkeypatch.setattr(sb.run_mod, "site_sensitivities", sensitivities)
    monkeypatch.setattr(sb.run_mod, "knapsack_start", after)
    with pytest.raises(RuntimeError):
        sb.run_method("knapsack", m)
    assert ledger.spent == pytest.approx(expected_spent)


def test_merge_rows_copies_only_missing_rows_and_refuses_other_settings():
    noise = {"n": 500, "noise_seed": 7, "noise_purpose": "report"}
    out = {"runs": 150, "heldout_noise": noise, "config": "base.py", "rows": {"N10/seed0/a": {"v": 1}}}
    other = {"runs": 150, "heldout_noise": noise, "config": "base.py",
             "rows": {"N10/seed0/a": {"v": 2}, "N10/seed2/b": {"v": 3}}}
    assert sb.merge_rows(out, other) == ["N10/seed2/b"]
    assert out["rows"] == {"N10/seed0/a": {"v": 1}, "N10/seed2/b": {"v": 3}}  # an existing row is kept as it is
    with pytest.raises(ValueError, match=r"--merge_from has runs=100, --out has 150"):
        sb.merge_rows(out, dict(other, runs=100))
