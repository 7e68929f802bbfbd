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
    m = SimpleNamespace(c=SimpleNamespace(), problem=SimpleNamespace(space=None, budget=None), ev=None, metric=None,
                        workdir=None, ledger=ledger, candidates={}, incumbents=[])

    def probes(*args):  # as site_sensitivities when the probes share the fitness noise: each probe is recorded
        for i in range(4):
            ledger.charge(1, 8, "probe")
            ledger.record(f"probe{i}".encode(), 0.1 * i)

    def after(*args):
        raise RuntimeError("reached the knapsack")

    monkeypatch.setattr(sb.run_mod, "site_sensitivities", probes if runs_out else lambda *a: ledger.record(b"p", 0.0))
    monkeypatch.setattr(sb.run_mod, "knapsack_start", after)
    with pytest.raises(BudgetExceeded if runs_out else RuntimeError):
        sb.run_method("knapsack", m)
    assert ledger.records == []
    assert sb.winner(m) is None
