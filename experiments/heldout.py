"""Shared pieces of the benchmarks: a config file with overrides, and held-out scoring of unit-range images
(Inception FID and classifier FD against the report reference, teacher MSE, 95% bootstrap intervals)."""

import importlib.util
from pathlib import Path

import numpy as np

from experiments import evaluate as ev_mod
from tmpq_jax import metrics as M
from tmpq_jax.search import run as run_mod


def load_config(path: str, **overrides):
    spec = importlib.util.spec_from_file_location("cfg", path)
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    c = cfg.get_config()
    for k, v in overrides.items():
        c[k] = v
    return c


def problem_at(c, workdir: str, num_steps: int):
    """(problem, work, tables, evaluator) of config `c` at N = num_steps; the tables are calibrated once and cached in
    WORKDIR/N<num_steps> (shared by the benchmarks that use this workdir)."""
    c.num_steps = num_steps
    run_mod.validate_config(c)
    problem = run_mod.build_problem(c)
    work = Path(workdir) / f"N{num_steps}"
    work.mkdir(parents=True, exist_ok=True)
    tables = run_mod.calibrate(c, problem, work)
    return problem, work, tables, run_mod.make_evaluator(c, problem, tables)


class Scorer:
    """Scores of image sets of n samples against `c.report_reference`, with one shared set of bootstrap rows."""

    def __init__(self, c, n, bootstrap, seed):
        self.fx = ev_mod._Features(c, c.report_reference)
        self.idx = M.bootstrap_indices(n, bootstrap, seed=seed)

    def __call__(self, unit: np.ndarray, teacher_unit: np.ndarray | None) -> dict:
        out = {}
        for m in ("inception_fid", "classifier_fd"):
            space = "inception" if m == "inception_fid" else "classifier"
            f = self.fx.extract(space, unit)
            fr = self.fx.frechet(space)
            v, boots = fr.distance(f), fr.bootstrap(f, self.idx)
            out[m] = {"value": ev_mod._num(v), **ev_mod._interval(v, boots)}
        if teacher_unit is not None:
            d = np.mean(((unit - teacher_unit) * 2.0) ** 2, axis=(1, 2, 3))  # per sample, [-1, 1] pixels
            out["teacher_mse"] = {"value": float(d.mean()), **ev_mod._interval(d.mean(), d[self.idx].mean(1))}
        return out
