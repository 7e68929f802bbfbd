"""The search benchmark (issue 17): every method at the same number of sampler runs, over seeds, on held-out noise.

For each N in --num_steps and each seed in --seeds (the seed changes the search's random key and its fitness noise;
the calibration tables are shared), every method gets --runs sampler runs on the fitness noise (a run = one
candidate on `search_samples` samples; sensitivity probes on fewer samples cost less; `tmpq_jax.search.ledger`
refuses a method that would exceed its runs). Methods:

  local            sensitivities, knapsack start, its DP schedule and greedy_bits, then the local search ('local')
  evolution        the reference GA (TMPQ-DM's operators), no warm start
  greedy_bits      the greedy rule (2 runs)
  knapsack         sensitivities and the knapsack start alone (best by fitness)
  random           uniform random candidates, repaired into the budget
  timestep_only    the reference GA over timesteps at uniform W{budget_bits}A{budget_bits}
  precision_only   the reference GA over bits at DDIM-quad
  steps_then_bits  the quantization-aware timestep DP at uniform bits, then the local search over bits at that schedule

Each method's winner is its best by the select metric (--select_metric, default the fitness) after its top 3 are
re-scored on the select noise (the same for all);
winners and the incumbents after --anytime runs are sampled on report noise no search used (--heldout_samples,
--heldout_seed) and scored against the held-out digits: Inception FID and classifier FD with 95% bootstrap intervals.
Rows are saved as they finish and reused.

python experiments/search_benchmark.py --num_steps 5,10 --seeds 0,1,2 --runs 150 \
    --out benchmarks/search_benchmark_cpu.json
"""

import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax.cpu_flags import apply_cpu_xla_flags  # noqa: E402
apply_cpu_xla_flags()  # before JAX starts: LLVM -O1 on CPU-only machines (tmpq_jax/cpu_flags.py)
from experiments import heldout as ho  # noqa: E402
from tmpq_jax import data, quant  # noqa: E402
from tmpq_jax.benchmark import machine, sole_writer  # noqa: E402
from tmpq_jax.search import run as run_mod  # noqa: E402
from tmpq_jax.search.driver import SearchSettings, decode_np, evolve  # noqa: E402
from tmpq_jax.search.fitness import NoiseSet, candidate_key, nan_to_inf  # noqa: E402
from tmpq_jax.search.ledger import BudgetExceeded, LedgerEvaluator, RunLedger  # noqa: E402

METHODS = ("local", "evolution", "greedy_bits", "knapsack", "random", "timestep_only", "precision_only",
           "steps_then_bits")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    flags.DEFINE_string("config", "experiments/configs/search_benchmark_base.py", "Base config (model, calibration, "
                       "fitness; the search settings of every committed row).")
    flags.DEFINE_list("num_steps", ["5", "10"], "N values.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Search seeds (random key and fitness noise).")
    flags.DEFINE_list("methods", list(METHODS), f"Methods, of {list(METHODS)}.")
    flags.DEFINE_integer("runs", 150, "Sampler runs on the fitness noise per method.")
    flags.DEFINE_list("anytime", ["25", "50", "100", "150"], "Run counts at which the incumbent is scored held-out.")
    flags.DEFINE_integer("heldout_samples", 500, "Report-noise samples per held-out score.")
    flags.DEFINE_integer("heldout_seed", 7, "Seed of the report noise (no search uses it).")
    flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples.")
    flags.DEFINE_string("metric", "", "Fitness metric of every method ('' = the config's); rows get '@METRIC'.")
    flags.DEFINE_string("select_metric", "", "Metric of every method's winner re-scoring on the select noise ('' = "
                        "the config's); rows get '^METRIC'.")
    flags.DEFINE_integer("search_samples", 0, "Fitness samples per candidate (0 = the config's); a run is one "
                         "candidate at this many samples, so --runs must shrink for equal cost; rows get '/sS'.")
    flags.DEFINE_string("workdir", "runs/search_benchmark", "Tables, teachers and samples.")
    flags.DEFINE_string("out", "benchmarks/search_benchmark_cpu.json", "Output JSON (and its plot, .png).")
    flags.DEFINE_bool("plot_only", False, "Only redraw the plot of --out.")
    flags.DEFINE_string("merge_from", "", "Only copy into --out the rows of this benchmark JSON that --out lacks (same "
                        "runs and held-out noise; e.g. rows run in parallel into a copy), then rebuild its summary "
                        "and plot.")


def base_config(n: int):
    c = ho.load_config(FLAGS.config, reconstruct=False)  # the CPU default's calibration
    c.num_steps = n
    c.baselines = ()
    if FLAGS.metric:
        c.metric = FLAGS.metric
    if FLAGS.select_metric:
        c.select_metric = FLAGS.select_metric
    if FLAGS.search_samples:
        c.search_samples = FLAGS.search_samples
    return c


def row_suffix() -> str:
    return ((f"@{FLAGS.metric}" if FLAGS.metric else "") + (f"^{FLAGS.select_metric}" if FLAGS.select_metric else "")
            + (f"/s{FLAGS.search_samples}" if FLAGS.search_samples else ""))


class Method:
    """One method's run: its evaluator (charged to a ledger of `runs`), problem and config."""

    def __init__(self, c, problem, tables, metric, workdir: Path, runs: int):
        self.c, self.problem, self.metric, self.workdir = c, problem, metric, workdir
        self.select = run_mod.build_metrics(c).selection  # the winner's re-scoring metric (`winner`)
        inner = run_mod.make_evaluator(c, problem, tables)
        self.fitness_set = NoiseSet(c.noise_seed, "fitness", c.search_samples)
        self.ledger = RunLedger(runs, c.search_samples)
        self.ev = LedgerEvaluator(inner, self.ledger, self.fitness_set, candidate_key)
        self.candidates = self.ev.candidates
        self.incumbents: list[bytes] = []  # candidate keys that join the winner's re-scoring (`winner`)

    def score(self, space, pop):
        ts, wb, ab = decode_np(space, pop)
        return nan_to_inf(self.ev.evaluate(ts, wb, ab, self.fitness_set, [self.metric])[:, 0])

    def generations_left(self, population: int) -> int:
        return int((self.ledger.limit - self.ledger.spent) // population)

    def evolve(self, name, algo, space, warm=(), refine=None):
        settings = SearchSettings(self.c.noise_seed, (self.c.search_samples,), 1.0, self.c.max_redraw, self.c.seed)
        g = self.generations_left(algo.population_size)
        if g < 1:
            return None
        return evolve(name, algo, space, self.problem.budget, self.ev, self.metric, settings, g, self.workdir,
                      {"benchmark": name}, False, warm, refine)


def dp_schedule(m: Method, genome):
    """`run.dp_timesteps`, charged: 2 x dp_per_group runs' worth of UNet passes at dp_samples (the quantized step
    from every candidate timestep and the fine FP teacher through them) per N steps."""
    m.ledger.charge(2 * m.c.dp_per_group, m.c.dp_samples, "timestep DP")
    return run_mod.dp_timesteps(m.c, m.problem, m.ev, genome)


def run_method(name, m: Method):
    c, problem = m.c, m.problem
    space, budget = problem.space, problem.budget
    if name == "greedy_bits":
        run_mod.greedy_finalist(c, problem, m.ev, m.metric, m.select)
    elif name == "random":
        while m.generations_left(c.population_size) >= 1:
            pop = jax.vmap(space.random)(jax.random.split(jax.random.fold_in(jax.random.key(c.seed), int(
                m.ledger.spent)), c.population_size))
            pop, _, ok = budget.repair(jax.tree.map(np.asarray, pop), space)
            m.score(space, jax.tree.map(lambda x: x[ok], pop))
    elif name in ("knapsack", "local", "steps_then_bits"):
        spent = m.ledger.spent
        try:
            sens = run_mod.site_sensitivities(c, problem, m.ev, m.metric, m.workdir)
        finally:  # probes are not candidates of the method, also when its runs ran out during them
            m.ledger.records.clear()
        if m.ledger.spent == spent:  # loaded from the workdir's cache: charged as if sampled (equal cost)
            m.ledger.charge(sens.runs, c.sensitivity_samples, "sensitivities (cached)")
        start = run_mod.knapsack_start(c, problem, sens)
        fill = run_mod.local.make_fill(budget, sens.w_damage, sens.a_damage)
        if name == "knapsack":
            m.score(space, jax.tree.map(lambda *x: np.stack(x), *start))
        elif name == "local":  # as run_search: knapsack optima, their DP schedule and greedy_bits (charged)
            start.append(dp_schedule(m, start[len(start) // 2]))
            if c.get("rescore_starts", False):  # as run_search: the warm start joins the select re-scoring
                m.incumbents += [candidate_key(*decode_np(space, g)) for g in start]
            greedy = run_mod.greedy_finalist(c, problem, m.ev, m.metric, m.select)
            start += [greedy.genome] if greedy is not None else []
            if greedy is not None and c.rescore_incumbents:  # as run_search: it joins the select re-scoring
                m.incumbents.append(candidate_key(*decode_np(space, greedy.genome)))
            m.evolve("local", run_mod.make_algorithm(c, space, tuple(problem.sites.paths)), space,
                     start[-(c.population_size - 1):], fill)
        else:
            steps = dp_schedule(m, space.seed())
            sub = space.restrict(search_timesteps=False).with_seed_timesteps(steps.timestep_idx)
            warm = [g.replace(timestep_idx=steps.timestep_idx) for g in start][: c.population_size - 1]
            m.evolve("steps_then_bits", run_mod.make_algorithm(c, sub, tuple(problem.sites.paths)), sub, warm, fill)
    else:
        sub = run_mod.single_axis_space(space, name) if name in run_mod.SINGLE_AXIS else space
        m.evolve(name, run_mod.make_algorithm(c, sub), sub)


def winner(m: Method):
    """Top 3 distinct by fitness, and the method's incumbents (`run.rescore`), re-scored on the select noise; the
    best there."""
    fits = {k: f for _, k, f in m.ledger.records if np.isfinite(f)}
    recs = sorted(fits.items(), key=lambda kv: kv[1])[:3]
    recs += [(k, fits[k]) for k in m.incumbents if k in fits and k not in dict(recs)]
    if not recs:
        return None
    sel = NoiseSet(m.c.noise_seed, "select", m.c.select_samples)
    arrs = [m.candidates[k] for k, _ in recs]
    s = m.ev._inner.evaluate(*(np.stack(x) for x in zip(*arrs)), sel, [m.select])[:, 0]
    i = int(np.argmin(nan_to_inf(s)))
    return recs[i][0], recs[i][1], float(s[i])


def heldout(m: Method, key, scorer, cache: dict) -> dict:
    if key not in cache:
        ts, wb, ab = m.candidates[key]
        noise = NoiseSet(FLAGS.heldout_seed, "report", FLAGS.heldout_samples)
        unit = data.to_unit_range(m.ev._inner.sample(ts[None], wb[None], ab[None], noise)[0])
        out = scorer(unit, None)
        cache[key] = {k: out[k] for k in ("inception_fid", "classifier_fd")}
    return cache[key]


def plot(rows: dict, out_png: Path) -> None:
    """Per N: each method's held-out winner per seed (Inception FID against classifier FD, with 95% intervals) and
    its anytime curve (held-out Inception FID of the incumbent after k runs), FP DDIM-quad as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["num_steps"] for r in rows.values()})
    if not ns:
        return
    methods = sorted({r["method"] for r in rows.values() if r.get("method") != "fp_quad" and "heldout" in r})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    markers = "os^Dv<>p*h"
    fig, axes = plt.subplots(len(ns), 2, figsize=(12, 4.5 * len(ns)), squeeze=False)
    for (ax_w, ax_a), n in zip(axes, ns):
        fp = rows.get(f"N{n}/fp_quad", {}).get("heldout")
        for r in (r for r in rows.values() if r["num_steps"] == n and r.get("method") != "fp_quad"
                  and "heldout" in r):
            h, col, mk = r["heldout"], colors[r["method"]], markers[r["seed"] % len(markers)]
            x, y = h["inception_fid"], h["classifier_fd"]
            ax_w.errorbar(x["value"], y["value"], xerr=[[x["value"] - x["ci95"][0]], [x["ci95"][1] - x["value"]]],
                          yerr=[[y["value"] - y["ci95"][0]], [y["ci95"][1] - y["value"]]], color=col, marker=mk,
                          ms=6, lw=0.7, capsize=2, label=f"{r['method']} seed {r['seed']}")
            pts = sorted((int(k), v["inception_fid"]["value"]) for k, v in r.get("anytime", {}).items() if v)
            if pts:
                ax_a.plot(*zip(*pts), color=col, marker=mk, ms=4, lw=1, label=f"{r['method']} seed {r['seed']}")
        if fp:
            ax_w.axvline(fp["inception_fid"]["value"], color="k", ls=":", lw=1, label="FP DDIM-quad (unquantized)")
            ax_w.axhline(fp["classifier_fd"]["value"], color="k", ls=":", lw=1)
            ax_a.axhline(fp["inception_fid"]["value"], color="k", ls=":", lw=1, label="FP DDIM-quad (unquantized)")
        ax_w.set(xlabel="held-out Inception FID", ylabel="held-out classifier FD",
                 title=f"N = {n}: winners (n = {FLAGS.heldout_samples}, report seed {FLAGS.heldout_seed})")
        ax_a.set(xlabel="sampler runs spent", ylabel="held-out Inception FID of the incumbent",
                 title=f"N = {n}: anytime")
        ax_w.legend(fontsize=6, ncol=2)
        ax_a.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main(argv):
    del argv
    with sole_writer(FLAGS.out):  # two writers of one --out would lose rows
        extend_out()


def extend_out():
    out_path = Path(FLAGS.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if FLAGS.plot_only:
        plot(result.get("rows", {}), out_path.with_suffix(".png"))
        return
    if FLAGS.merge_from:
        merge_rows(result, json.loads(Path(FLAGS.merge_from).read_text()))
        save(out_path, result)
        return
    rows = result.setdefault("rows", {})
    bad = [x for x in FLAGS.methods if x not in METHODS]
    if bad:
        raise ValueError(f"--methods has unknown {bad}; valid: {list(METHODS)}")
    anytime = sorted(int(a) for a in FLAGS.anytime)
    if FLAGS.search_samples < 0:
        raise ValueError(f"--search_samples={FLAGS.search_samples} must be >= 1 (or 0 for the config's)")
    if any(a > FLAGS.runs or a < 1 for a in anytime):
        raise ValueError(f"--anytime {anytime} must lie in [1, --runs={FLAGS.runs}]")
    for n in (int(x) for x in FLAGS.num_steps):
        c0 = base_config(n)
        problem, work, tables, ev = ho.problem_at(c0, FLAGS.workdir, n)
        metric = run_mod.build_metrics(c0).fitness
        scorer = ho.Scorer(c0, FLAGS.heldout_samples, FLAGS.bootstrap, FLAGS.heldout_seed)
        scored: dict = {}
        fp_key = f"N{n}/fp_quad"
        if fp_key not in rows:  # FP DDIM-quad at N steps, unquantized: where quantized winners stand
            ts = np.asarray(problem.space.timesteps(problem.space.seed()))
            unit = data.to_unit_range(ev.sample_fp(ts, NoiseSet(FLAGS.heldout_seed, "report", FLAGS.heldout_samples)))
            out = scorer(unit, None)
            rows[fp_key] = {"num_steps": n, "method": "fp_quad", "timesteps": ts.tolist(), "runs_spent": 0,
                            "bitops": int(quant.fp_bitops(problem.sites, n)),
                            "heldout": {k: out[k] for k in ("inception_fid", "classifier_fd")}}
            print(fp_key, {k: v["value"] for k, v in rows[fp_key]["heldout"].items()}, flush=True)
            save(out_path, result)
        for seed in (int(s) for s in FLAGS.seeds):
            for name in FLAGS.methods:
                suffix = row_suffix()
                row_key = f"N{n}/seed{seed}/{name}{suffix}"
                if row_key in rows and rows[row_key].get("runs_limit") == FLAGS.runs:
                    continue
                c = c0.copy_and_resolve_references()
                c.seed, c.noise_seed = seed, seed
                c.algorithm = "local" if name in ("knapsack", "local", "steps_then_bits") else "evolution"
                wd = work / f"seed{seed}" / (name + suffix)
                wd.mkdir(parents=True, exist_ok=True)
                m = Method(c, problem, tables, metric, wd, FLAGS.runs)
                run_mod.make_teachers(c, problem, m.ev._inner, run_mod.build_metrics(c), work / f"seed{seed}")
                t0 = time.time()
                stopped = None
                try:
                    run_method(name, m)
                except BudgetExceeded as e:  # the method's next step did not fit: it ends with what it scored
                    stopped = str(e)
                    print(f"{row_key}: stopped: {e}", flush=True)
                w = winner(m)
                row = {"num_steps": n, "seed": seed, "method": name + suffix, "metric": c.metric,
                       "select_metric": run_mod.select_metric_name(c), "suffix": suffix, "runs_limit": FLAGS.runs,
                       "runs_spent": m.ledger.spent, "seconds": time.time() - t0, "stopped": stopped}
                if w is not None:
                    ts, wb, ab = m.candidates[w[0]]
                    row.update({"timesteps": ts.tolist(), "w_bits": wb.tolist(), "a_bits": ab.tolist(),
                                "bitops": int(problem.budget.cost(wb, ab)), "fitness": w[1], "selection": w[2],
                                "heldout": heldout(m, w[0], scorer, scored)})
                    row["anytime"] = {}
                    for a in anytime:
                        inc = m.ledger.incumbent(a)
                        row["anytime"][str(a)] = None if inc is None else {"fitness": inc[1],
                                                                          **heldout(m, inc[0], scorer, scored)}
                rows[row_key] = row
                print(row_key, {k: row.get(k) for k in ("runs_spent", "fitness")},
                      {k: v["value"] for k, v in row.get("heldout", {}).items()}, flush=True)
                save(out_path, result)
    save(out_path, result)


def summary(rows: dict) -> dict:
    """Per N and method over seeds: mean held-out values, and per seed the ratio to greedy_bits of the same seed."""
    out: dict = {}
    for key, r in rows.items():
        if r.get("method") == "fp_quad" or "heldout" not in r:
            continue
        g = rows.get(f"N{r['num_steps']}/seed{r['seed']}/greedy_bits{r.get('suffix', '')}", {}).get("heldout")
        s = out.setdefault(f"N{r['num_steps']}", {}).setdefault(r["method"], {"seeds": [], "inception_fid": [],
                                                                               "classifier_fd": []})
        s["seeds"].append(r["seed"])
        for m in ("inception_fid", "classifier_fd"):
            s[m].append(r["heldout"][m]["value"])
            if g is not None:
                s.setdefault(f"{m}_ratio_to_greedy", []).append(r["heldout"][m]["value"] / g[m]["value"])
    for per_n in out.values():
        for s in per_n.values():
            for m in ("inception_fid", "classifier_fd"):
                s[f"{m}_mean"] = float(np.mean(s[m]))
    return out


def merge_rows(result: dict, other: dict) -> list[str]:
    """Copy into `result` the rows of `other` it lacks; refuses JSONs of other runs, held-out noise or config."""
    for k in ("runs", "heldout_noise", "config"):
        if k in result and result[k] != other.get(k):
            raise ValueError(f"--merge_from has {k}={other.get(k)!r}, --out has {result[k]!r}: rows of different "
                             f"settings cannot share one table")
    added = [k for k in other.get("rows", {}) if k not in result.setdefault("rows", {})]
    for k in added:
        result["rows"][k] = other["rows"][k]
    print(f"merged {len(added)} rows: {added}", flush=True)
    return added


def save(out_path: Path, result: dict) -> None:
    result["summary"] = summary(result.get("rows", {}))
    result.update({
        "config": FLAGS.config, "runs": FLAGS.runs,
        "heldout_noise": NoiseSet(FLAGS.heldout_seed, "report", FLAGS.heldout_samples).describe(),
        "reference": "mnist-heldout (500 held-out digits)", "interval": "95% bootstrap percentile, bias-shifted",
        "machine": machine(),
        "command": "python experiments/search_benchmark.py " + " ".join(sys.argv[1:]),
    })
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result.get("rows", {}), out_path.with_suffix(".png"))


if __name__ == "__main__":
    define_flags()
    app.run(main)
