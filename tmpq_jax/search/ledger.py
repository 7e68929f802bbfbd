"""Equal-cost accounting of a search method: sampler runs charged against a limit, and the incumbent over time.

A run is one candidate sampled on `unit_samples` noise samples (the fitness sample count); a candidate sampled on n
samples costs n / unit_samples runs, so sensitivity probes on fewer samples cost less. Cached scores cost nothing
(the evaluator never samples a candidate twice on one noise set). A charge past the limit raises before any
sampling: a method cannot exceed its runs.
"""

from __future__ import annotations

import dataclasses

import numpy as np


class BudgetExceeded(RuntimeError):
    pass


@dataclasses.dataclass
class RunLedger:
    limit: float
    unit_samples: int
    spent: float = 0.0
    records: list = dataclasses.field(default_factory=list)  # (runs spent after it, candidate key, fitness)

    def cost(self, num_candidates: int, num_samples: int) -> float:
        return num_candidates * num_samples / self.unit_samples

    def charge(self, num_candidates: int, num_samples: int, what: str = "") -> None:
        runs = self.cost(num_candidates, num_samples)
        if self.spent + runs > self.limit + 1e-9:
            raise BudgetExceeded(f"{what or 'evaluation'}: {runs:g} more runs would exceed the limit of "
                                 f"{self.limit:g} ({self.spent:g} spent)")
        self.spent += runs

    def record(self, key, fitness: float) -> None:
        self.records.append((self.spent, key, float(fitness)))

    def incumbent(self, at_runs: float):
        """(key, fitness) of the best finite fitness recorded within `at_runs` runs, or None."""
        best = None
        for spent, key, f in self.records:
            if spent <= at_runs + 1e-9 and np.isfinite(f) and (best is None or f < best[1]):
                best = (key, f)
        return best


class LedgerEvaluator:
    """An Evaluator whose `evaluate` charges the ledger for the candidates it will sample (uncached, feasible,
    distinct) before sampling, and records every fitness on `fitness_set`. Everything else is the wrapped one's."""

    def __init__(self, inner, ledger: RunLedger, fitness_set, candidate_key):
        self._inner, self.ledger, self.fitness_set, self._key = inner, ledger, fitness_set, candidate_key
        self.candidates = {}  # key -> (timesteps, w_bits, a_bits) of every candidate recorded

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def evaluate(self, timesteps, w_bits, a_bits, noise_set, metric_list, feasible=None):
        ts, wb, ab = (np.asarray(a) for a in (timesteps, w_bits, a_bits))
        ok = np.ones(len(ts), bool) if feasible is None else np.asarray(feasible, bool)
        keys = [self._key(ts[i], wb[i], ab[i]) for i in range(len(ts))]
        names = [m.name for m in metric_list]
        new = {k for i, k in enumerate(keys) if ok[i] and any((k, noise_set, n) not in self._inner.cache
                                                              for n in names)}
        self.ledger.charge(len(new), noise_set.n, f"{len(new)} candidates on {noise_set}")
        out = self._inner.evaluate(ts, wb, ab, noise_set, metric_list, feasible)
        if noise_set == self.fitness_set:
            for i, k in enumerate(keys):
                if ok[i]:
                    self.ledger.record(k, out[i, 0])
                    self.candidates[k] = (ts[i], wb[i], ab[i])
        return out
