"""Does a fitness predict the final metric? A fixed panel of varied candidates at the default N and budget, each
scored by every registered fitness (fitness noise, fitness reference) and by the truth: Inception FID and classifier
FD at n >= 500 on held-out report noise against the 500 held-out digits. Reports Spearman and Kendall rank
correlations with bootstrap intervals (over candidates) and CPU seconds per candidate; one scatter plot per fitness.

python experiments/fitness_fidelity.py --out benchmarks/fitness_fidelity_cpu.json [--workdir runs/fidelity]
    [--truth_samples 500] [--fitness_samples 16,40] [--summarize_only]
    [--visited benchmarks/search_benchmark_cpu.json --neighbours 1 [--visited_only]]

`--visited` adds the candidates searches actually visit (issue 17, item 0): every winner in a search_benchmark JSON
at the config's N, and `--neighbours` local mutants of each (`operators.mutate_local`, 2 genes on average, repaired
into the budget). The summary then also has correlations over the visited part alone (`<truth>/visited`). A winner's
truth is taken from the benchmark JSON where it was measured on this run's truth noise (same seed, purpose and n:
pass --config.report_noise_seed=7 --truth_samples 500 for the benchmark's defaults). `--visited_only` skips the
hand-picked panel. Pass a --config.noise_seed no search used, so the fitness is not scored on the noise that chose
the winners.

Per-candidate rows are appended to WORKDIR/panel.jsonl as they finish, so an interrupted run continues.
"""

import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax.cpu_flags import apply_cpu_xla_flags  # noqa: E402
apply_cpu_xla_flags()  # before JAX starts: LLVM -O1 on CPU-only machines (tmpq_jax/cpu_flags.py)
from tmpq_jax import metrics  # noqa: E402
from tmpq_jax.benchmark import environment  # noqa: E402
from tmpq_jax.search import fitness as fit_mod  # noqa: E402
from tmpq_jax.search import run as run_mod  # noqa: E402
from tmpq_jax.search.algorithm import mutate  # noqa: E402
from tmpq_jax.search.driver import decode_np  # noqa: E402
from tmpq_jax.search.fitness import METRICS, NoiseSet  # noqa: E402
from tmpq_jax.search.space import Genome  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "configs", "default.py"),
                                    "Search config (model, N, budget, references, noise seeds).")
    flags.DEFINE_string("workdir", "runs/fidelity", "Calibration tables, teachers and panel.jsonl.")
    flags.DEFINE_string("out", "benchmarks/fitness_fidelity_cpu.json", "Summary JSON; plots next to it.")
    flags.DEFINE_integer("truth_samples", 500, "Samples per candidate for the truth (report noise).")
    flags.DEFINE_list("fitness_samples", ["16", "40"], "Sample counts at which every fitness is scored.")
    flags.DEFINE_list("metrics", [], "Fitness metrics to score (default: every registered one the model allows).")
    flags.DEFINE_integer("panel_seed", 0, "Seed of the panel's random candidates.")
    flags.DEFINE_integer("bootstrap", 2000, "Bootstrap resamples of the candidates for the correlation intervals.")
    flags.DEFINE_integer("limit", 0, "Score only the first LIMIT panel candidates (smoke runs); 0 = all.")
    flags.DEFINE_bool("summarize_only", False, "Only recompute the summary from WORKDIR/panel.jsonl.")
    flags.DEFINE_list("visited", [], "search_benchmark JSON files whose winners (at the config's N) join the panel.")
    flags.DEFINE_integer("neighbours", 1, "Local mutants of each visited winner that join the panel.")
    flags.DEFINE_bool("visited_only", False, "Score only the --visited candidates (not the hand-picked panel).")

TRUTH = ("inception_fid", "classifier_fd")


def panel(problem, key) -> list[tuple[str, Genome]]:
    """32+ candidates: uniform and asymmetric WxAy, single-axis, greedy, seed mutants and random joint ones."""
    space, budget = problem.space, problem.budget
    out = []
    for w, a in [(8, 8), (7, 7), (6, 6), (5, 5), (5, 7), (7, 5), (6, 5), (5, 6)]:
        g = space.uniform_bits(6)
        out.append((f"uniform_w{w}a{a}", Genome(np.asarray(g.timestep_idx), np.full(space.num_sites, space.bit_choices.index(w)),
                                                np.full(space.num_sites, space.bit_choices.index(a)))))
    for name, a_start in [("greedy_bits", None), ("greedy_bits_a2", space.bit_choices[-2])]:
        out.append((name, budget.greedy_bits(space, a_start)))
    keys = iter(jax.random.split(key, 64))
    t_only = space.restrict(search_bits=False)
    for i in range(6):
        out.append((f"timestep_only_{i}", t_only.random(next(keys))))
    b_only = space.restrict(search_timesteps=False)
    for i in range(6):
        out.append((f"precision_only_{i}", b_only.random(next(keys))))
    for i in range(4):
        out.append((f"seed_mutant_{i}", mutate(next(keys), space.seed(), space, 0.1)))
    for i in range(8):
        out.append((f"random_{i}", space.random(next(keys))))
    named = [(n, jax.tree.map(np.asarray, g)) for n, g in out]
    # bits repaired into the budget within each candidate's own space (uniform ones are kept as they are)
    fixed = []
    for n, g in named:
        if not n.startswith("uniform_"):
            sub = t_only if n.startswith("timestep_only") else b_only if n.startswith("precision_only") else space
            g = jax.tree.map(lambda x: x[0], budget.repair(jax.tree.map(lambda x: x[None], g), sub)[0])
        fixed.append((n, g))
    return fixed


def visited_panel(problem, files, neighbours: int, key, truth_noise: dict) -> tuple[list, dict]:
    """Winners of search_benchmark rows at this N, and `neighbours` local mutants of each, inside the budget; and
    the held-out truth a benchmark already measured for a winner, where its noise (seed, purpose, n) is the truth
    noise of this run (name -> {metric: value}), so that it is not sampled again."""
    from tmpq_jax.search.operators import mutate_local

    space, budget = problem.space, problem.budget
    out, known, seen = [], {}, set()
    for f in files:
        bench = json.loads(Path(f).read_text())
        same_noise = bench.get("heldout_noise") == truth_noise
        for name, r in sorted(bench.get("rows", {}).items()):
            if r.get("num_steps") != space.num_steps or "w_bits" not in r or r.get("method") == "fp_quad":
                continue
            cand = (tuple(r["timesteps"]), tuple(r["w_bits"]), tuple(r["a_bits"]))
            if cand in seen:  # e.g. greedy_bits of every seed: one panel point
                continue
            seen.add(cand)
            g = space.encode(r["timesteps"], r["w_bits"], r["a_bits"])
            out.append((f"visited/{name}", g))
            if same_noise and all(m in r.get("heldout", {}) for m in TRUTH):
                known[f"visited/{name}"] = {m: r["heldout"][m]["value"] for m in TRUTH}
            for k in range(neighbours):
                m = jax.tree.map(np.asarray, mutate_local(jax.random.fold_in(key, len(out)), g, space, 2.0))
                m = jax.tree.map(lambda x: x[0], budget.repair(jax.tree.map(lambda x: x[None], m), space)[0])
                out.append((f"visited/{name}/neighbour{k}", m))
    return out, known


def score_candidate(c, problem, evaluator, name, g, fitness_metrics, truth_metrics, fitness_ns, truth_ns,
                    truth=None):
    ts, wb, ab = decode_np(problem.space, jax.tree.map(lambda x: x[None], g))
    row = {"name": name, "bitops": int(problem.budget.cost_of(g)), "feasible": bool(problem.budget.is_feasible(g)),
           "timesteps": ts[0].tolist(), "mean_w_bits": float(np.average(wb[0], weights=problem.sites.macs)),
           "mean_a_bits": float(np.average(ab[0], weights=problem.sites.macs)), "fitness": {}, "seconds": {}}
    for ns in fitness_ns:
        t0 = time.process_time()
        images = evaluator.sample(ts, wb, ab, ns)[0]
        row["seconds"][f"sample@{ns.n}"] = time.process_time() - t0
        for m in fitness_metrics:
            t0 = time.process_time()
            teacher = evaluator.teacher(ns) if m.paired else None
            row["fitness"][f"{m.name}@{ns.n}"] = fit_mod.finite_or_none(m(images, teacher))
            row["seconds"][f"{m.name}@{ns.n}"] = time.process_time() - t0
    if truth is not None:  # measured by the benchmark on the same truth noise
        row["truth"], row["truth_from_benchmark"] = dict(truth), True
        return row
    images = evaluator.sample(ts, wb, ab, truth_ns)[0]
    row["truth"] = {m.name: fit_mod.finite_or_none(m(images)) for m in truth_metrics}
    return row


def summarize(rows, fitness_keys, seconds, n_boot, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for fk in fitness_keys:
        entry = {"cpu_seconds_per_candidate": seconds.get(fk), "correlations": {}}
        for truth in TRUTH:
            for subset in ("all", "feasible", "visited"):
                pts = [(r["fitness"][fk], r["truth"][truth]) for r in rows
                       if r["fitness"].get(fk) is not None and r["truth"].get(truth) is not None
                       and (subset == "all" or (subset == "feasible" and r["feasible"])
                            or (subset == "visited" and r["name"].startswith("visited/")))]
                if len(pts) < 4:
                    continue
                x, y = np.asarray(pts).T
                rho, tau = stats.spearmanr(x, y)[0], stats.kendalltau(x, y)[0]
                boot = []
                for _ in range(n_boot):
                    i = rng.integers(0, len(x), len(x))
                    if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
                        boot.append((stats.spearmanr(x[i], y[i])[0], stats.kendalltau(x[i], y[i])[0]))
                boot = np.asarray(boot)
                entry["correlations"][f"{truth}/{subset}"] = {
                    "n_candidates": len(x), "spearman": float(rho), "kendall": float(tau),
                    "spearman_ci95": list(metrics.percentile_interval(boot[:, 0])),
                    "kendall_ci95": list(metrics.percentile_interval(boot[:, 1]))}
        rho = entry["correlations"].get("inception_fid/all", {}).get("spearman")
        entry["spearman_inception_per_cpu_second"] = (rho / seconds[fk]) if rho is not None and seconds.get(fk) \
            else None
        out[fk] = entry
    return out


def plot(rows, fitness_keys, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    nrows = -(-len(fitness_keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, fk in zip(axes.ravel(), fitness_keys):
        pts = [(r["fitness"][fk], r["truth"]["inception_fid"], r["feasible"]) for r in rows
               if r["fitness"].get(fk) is not None and r["truth"].get("inception_fid") is not None]
        if pts:
            x, y, ok = (np.asarray(v) for v in zip(*pts))
            ax.scatter(x[ok], y[ok], s=14, label="within budget")
            ax.scatter(x[~ok], y[~ok], s=14, marker="x", label="over budget")
            rho = stats.spearmanr(x, y)[0]
            ax.set_title(f"{fk}  (Spearman {rho:.2f})", fontsize=9)
        ax.set_xlabel("fitness (fitness noise)", fontsize=8)
        ax.set_ylabel("Inception FID, n=500 held-out", fontsize=8)
    for ax in axes.ravel()[len(fitness_keys):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    c = FLAGS.config
    workdir = Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "panel.jsonl"
    sizes = sorted(int(n) for n in FLAGS.fitness_samples)
    names = FLAGS.metrics or [n for n, info in METRICS.items()
                              if not info.mnist_only or c.model.startswith("mnist")]
    fitness_keys = [f"{m}@{n}" for m in names for n in sizes]
    rows = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    if not FLAGS.summarize_only:
        run_mod.validate_config(c)
        problem = run_mod.build_problem(c)
        fitness_metrics = [fit_mod.make_metric(n, c, c.fitness_reference) for n in names]
        truth_metrics = [fit_mod.make_metric(n, c, c.report_reference) for n in TRUTH]
        tables = run_mod.calibrate(c, problem, workdir)
        evaluator = run_mod.make_evaluator(c, problem, tables)
        fitness_ns = [NoiseSet(c.noise_seed, "fitness", n) for n in sizes]
        truth_ns = NoiseSet(c.report_noise_seed, "report", FLAGS.truth_samples)
        for ns in fitness_ns:
            run_mod.teacher_images(c, problem, evaluator, ns, workdir)
        cands = [] if FLAGS.visited_only else panel(problem, jax.random.key(FLAGS.panel_seed))
        order = np.random.default_rng(FLAGS.panel_seed).permutation(len(cands))  # partial results stay varied
        visited, known = visited_panel(problem, FLAGS.visited, FLAGS.neighbours,
                                       jax.random.key(FLAGS.panel_seed + 1), truth_ns.describe())
        order = np.r_[order, len(cands) + np.arange(len(visited))].astype(int)
        cands = cands + visited
        order = order[: FLAGS.limit or len(order)]
        done = {r["name"] for r in rows}
        for k, i in enumerate(order):
            name, g = cands[i]
            if name in done:
                continue
            t0 = time.time()
            row = score_candidate(c, problem, evaluator, name, g, fitness_metrics, truth_metrics, fitness_ns,
                                  truth_ns, known.get(name))
            rows.append(row)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[{k + 1}/{len(cands)}] {name}: truth {row['truth']} ({time.time() - t0:.0f} s)", flush=True)
    seconds = {}
    for fk in fitness_keys:
        m, n = fk.split("@")
        per = [r["seconds"].get(f"sample@{n}", 0) + r["seconds"].get(fk, 0) for r in rows if fk in r["seconds"]]
        seconds[fk] = float(np.mean(per)) if per else None
    summary = summarize(rows, fitness_keys, seconds, FLAGS.bootstrap)
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(sys.argv), "environment": environment(),
              "panel_size": len(rows), "truth": {"metrics": list(TRUTH), "n": FLAGS.truth_samples,
                                                 "noise_seed": c.report_noise_seed, "noise_purpose": "report",
                                                 "reference": c.report_reference},
              "fitness_noise": {"noise_seed": c.noise_seed, "noise_purpose": "fitness", "n": sizes,
                                "reference": c.fitness_reference},
              "cpu_seconds_note": "process CPU seconds per candidate: sampling at that n plus the metric",
              "fitness": summary, "candidates": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, fitness_keys, out.with_suffix(".png"))
    print(f"{'fitness':24s} {'Spearman(IncFID)':>18s} {'Kendall':>8s} {'Spearman(clsFD)':>16s} {'CPU s':>7s}")
    for fk, e in summary.items():
        a, b = e["correlations"].get("inception_fid/all", {}), e["correlations"].get("classifier_fd/all", {})
        print(f"{fk:24s} {a.get('spearman', float('nan')):18.3f} {a.get('kendall', float('nan')):8.3f} "
              f"{b.get('spearman', float('nan')):16.3f} {e['cpu_seconds_per_candidate'] or float('nan'):7.2f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
