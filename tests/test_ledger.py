"""Equal-cost accounting of the search benchmark (no model: a fake evaluator)."""

import numpy as np
import pytest

from tmpq_jax.search.fitness import NoiseSet, candidate_key
from tmpq_jax.search.ledger import BudgetExceeded, LedgerEvaluator, RunLedger


class Metric:
    name = "m"


class FakeEvaluator:
    def __init__(self):
        self.cache, self.sampled = {}, 0

    def evaluate(self, ts, wb, ab, noise_set, metric_list, feasible=None):
        ok = np.ones(len(ts), bool) if feasible is None else feasible
        out = []
        for i in range(len(ts)):
            k = candidate_key(ts[i], wb[i], ab[i])
            if ok[i] and (k, noise_set, "m") not in self.cache:
                self.sampled += 1
                self.cache[(k, noise_set, "m")] = float(wb[i].sum())
            out.append([self.cache[(k, noise_set, "m")] if ok[i] else np.inf])
        return np.asarray(out)


def population(bits):
    bits = np.asarray(bits)[:, None] * np.ones((1, 3), np.int32)
    return np.zeros((len(bits), 2), np.int32), bits, bits


def test_a_method_cannot_exceed_its_runs_and_cached_candidates_are_free():
    fit = NoiseSet(0, "fitness", 16)
    ledger = RunLedger(limit=5, unit_samples=16)
    ev = LedgerEvaluator(FakeEvaluator(), ledger, fit, candidate_key)
    ev.evaluate(*population([8, 7, 6]), fit, [Metric()])
    assert ledger.spent == 3 and ev.sampled == 3
    ev.evaluate(*population([8, 7, 7]), fit, [Metric()])  # all cached
    assert ledger.spent == 3
    ev.evaluate(*population([5, 5]), fit, [Metric()])  # one distinct new candidate
    assert ledger.spent == 4
    ev.evaluate(*population([4, 3]), NoiseSet(0, "fitness", 8), [Metric()])  # 8 samples: half a run each
    assert ledger.spent == 5
    with pytest.raises(BudgetExceeded, match="exceed the limit of 5"):
        ev.evaluate(*population([2]), fit, [Metric()])
    assert ev.sampled == 6  # refused before sampling
    # infeasible candidates are never sampled nor charged
    ledger2 = RunLedger(limit=1, unit_samples=16)
    ev2 = LedgerEvaluator(FakeEvaluator(), ledger2, fit, candidate_key)
    ev2.evaluate(*population([8, 7]), fit, [Metric()], feasible=np.array([True, False]))
    assert ledger2.spent == 1


def test_incumbent_after_each_budget():
    fit = NoiseSet(0, "fitness", 16)
    ledger = RunLedger(limit=10, unit_samples=16)
    ev = LedgerEvaluator(FakeEvaluator(), ledger, fit, candidate_key)
    for bits in ([8, 7], [6], [7, 5]):
        ev.evaluate(*population(bits), fit, [Metric()])
    assert ledger.incumbent(0) is None
    assert ledger.incumbent(2)[1] == 21  # 7 x 3 sites
    assert ledger.incumbent(3)[1] == 18 and ledger.incumbent(4)[1] == 15
