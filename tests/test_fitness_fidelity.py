"""experiments/fitness_fidelity.py's visited panel (issue 17, item 0): no model, a synthetic benchmark JSON."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np

from tmpq_jax.search.budget import Budget
from tmpq_jax.search.fitness import NoiseSet
from tmpq_jax.search.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import fitness_fidelity as ff  # noqa: E402

SPACE = SearchSpace.create(num_steps=3, num_sites=4)
BUDGET = Budget(10**12, (10, 20, 30, 40), (0,) * 4, (0,) * 4, SPACE.bit_choices, 3)
TRUTH_NOISE = NoiseSet(7, "report", 500).describe()


def row(method, seed, wb, fid, n=3):
    ts = np.asarray(SPACE.timesteps(SPACE.seed())).tolist()
    return {"num_steps": n, "seed": seed, "method": method, "timesteps": ts, "w_bits": wb, "a_bits": [8, 8, 6, 6],
            "heldout": {"inception_fid": {"value": fid}, "classifier_fd": {"value": 2 * fid}}}


def bench(tmp_path, name, noise):
    rows = {"N3/fp_quad": {"num_steps": 3, "method": "fp_quad", "timesteps": [1, 2, 3]},
            "N3/seed0/greedy_bits": row("greedy_bits", 0, [5, 5, 8, 8], 30.0),
            "N3/seed1/greedy_bits": row("greedy_bits", 1, [5, 5, 8, 8], 30.0),  # the same candidate again
            "N3/seed0/local": row("local", 0, [6, 6, 6, 6], 40.0),
            "N5/seed0/local": row("local", 0, [7, 7, 7, 7], 50.0, n=5)}  # another N: not this panel's
    path = tmp_path / name
    path.write_text(json.dumps({"heldout_noise": noise, "rows": rows}))
    return path


def test_visited_winners_are_deduplicated_and_reuse_truth_only_on_the_same_noise(tmp_path):
    problem = SimpleNamespace(space=SPACE, budget=BUDGET)
    same = bench(tmp_path, "same.json", TRUTH_NOISE)
    cands, known = ff.visited_panel(problem, [same], 0, jax.random.key(0), TRUTH_NOISE)
    assert [n for n, _ in cands] == ["visited/N3/seed0/greedy_bits", "visited/N3/seed0/local"]
    assert known == {"visited/N3/seed0/greedy_bits": {"inception_fid": 30.0, "classifier_fd": 60.0},
                     "visited/N3/seed0/local": {"inception_fid": 40.0, "classifier_fd": 80.0}}
    _, wb, _ = SPACE.decode(cands[1][1])
    assert np.asarray(wb).tolist() == [6, 6, 6, 6]
    other = bench(tmp_path, "other.json", NoiseSet(1, "report", 500).describe())
    cands, known = ff.visited_panel(problem, [other], 1, jax.random.key(0), TRUTH_NOISE)
    assert known == {}  # measured on other noise: sampled again
    assert [n for n, _ in cands] == ["visited/N3/seed0/greedy_bits", "visited/N3/seed0/greedy_bits/neighbour0",
                                     "visited/N3/seed0/local", "visited/N3/seed0/local/neighbour0"]
    assert all(BUDGET.is_feasible(g) for _, g in cands)
