"""A timestep search that sees the quantized model: a dynamic program over one-step errors (in the manner of GITS,
Chen et al. 2024), one timestep per group.

From a fine FP teacher trajectory through every candidate timestep, the cost of a step t -> t' is the error of one
DDIM step of the *quantized* model from the teacher's state at t against the teacher's state at t' (the first step
starts from the noise itself, as the sampler does; the last goes to the final sample). A schedule's cost is the sum of
its steps' costs; `chain_dp` finds the cheapest schedule with one timestep in each group exactly. The UNet output
at (x_teacher(t), t) does not depend on t', so the whole cost matrix takes one quantized forward per candidate
timestep.
"""

from __future__ import annotations

import numpy as np

from tmpq_jax.search.space import SearchSpace


def candidate_offsets(space: SearchSpace, per_group: int) -> list[np.ndarray]:
    """Offsets inside each group (ascending groups) that the program chooses from: `per_group` evenly spaced ones
    including 0 (the DDIM-quad seed), fewer where a group is smaller."""
    if not isinstance(per_group, (int, np.integer)) or per_group < 1:
        raise ValueError(f"per_group must be an integer >= 1, got {per_group!r}")
    return [np.unique(np.round(np.linspace(0, n - 1, min(per_group, int(n)))).astype(np.int32))
            for n in space.group_sizes]


def chain_dp(start: np.ndarray, transitions: list[np.ndarray], final: np.ndarray) -> tuple[np.ndarray, float]:
    """The cheapest chain that takes one option per group, top group first.

    start (K_top,): cost of the first step's source choice (e.g. 0); transitions[j] (K_j, K_{j+1}): cost from option
    a of group j to option b of group j + 1, groups in sampling order (descending t); final (K_last,): cost of the
    last step. Returns (option index per group in sampling order, total cost). Exact (Viterbi)."""
    start = np.asarray(start, np.float64)
    best = start.copy()
    back = []
    for j, tr in enumerate(transitions):
        tr = np.asarray(tr, np.float64)
        if tr.shape[0] != len(best):
            raise ValueError(f"transition {j} has {tr.shape[0]} sources, the group before has {len(best)} options")
        total = best[:, None] + tr
        back.append(np.argmin(total, axis=0))
        best = total[back[-1], np.arange(tr.shape[1])]
    final = np.asarray(final, np.float64)
    if len(final) != len(best):
        raise ValueError(f"final has {len(final)} costs, the last group has {len(best)} options")
    best = best + final
    k = int(np.argmin(best))
    total = float(best[k])
    path = [k]
    for b in reversed(back):
        k = int(b[k])
        path.append(k)
    return np.asarray(path[::-1], np.int64), total

