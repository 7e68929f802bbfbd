"""Where is the room above greedy_bits? (issue 17: what limits the search.) Held-out scores of a fixed panel:

  - FP (unquantized) and greedy_bits (both of its variants) at DDIM-quad and at each of --schedules: how much a
    schedule can give the quantized model, against what it gives FP;
  - other structured bit mixes at DDIM-quad that local moves hardly reach (--quad_mixes: uniform WwAa, e.g. W5A7,
    which fits the W6A6 budget; --quad_greedy_a_starts: greedy_bits from other activation widths);
  - every search winner of a search_benchmark JSON at the config's N (--visited): as found, its bits at DDIM-quad,
    and greedy_bits' bits (the variant of the benchmark's greedy_bits row) at its schedule: whether its held-out
    loss comes from its bits or from its schedule.

Scored on probe noise (--probe_seed, purpose 'report', --samples) that no search and no benchmark row used, against
the held-out digits (Inception FID, classifier FD, 95% bootstrap intervals). Nothing here selects a candidate.
Each row also gets what a search sees of it: the config's fitness on the select noise of --fitness_seed (64
samples, paired with the FP teacher), and the sharpness of its images (mean squared 4-neighbour Laplacian, [-1, 1]
pixels) next to the teacher's, to test whether pixel distances reward blur (on mnist-small it does not explain
Inception FID: README "The local search").

python experiments/headroom.py --config experiments/configs/default.py --num_steps 5 \
    --visited benchmarks/search_benchmark_cpu.json --out benchmarks/headroom_n5_cpu.json
"""

import dataclasses
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
from tmpq_jax import data  # noqa: E402
from tmpq_jax.benchmark import machine, sole_writer  # noqa: E402
from tmpq_jax.search import fitness as fit_mod  # noqa: E402
from tmpq_jax.search import pareto  # noqa: E402
from tmpq_jax.search import run as run_mod  # noqa: E402
from tmpq_jax.search.driver import decode_np  # noqa: E402
from tmpq_jax.search.fitness import NoiseSet  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    flags.DEFINE_string("config", "experiments/configs/default.py", "Base config (model, calibration).")
    flags.DEFINE_integer("num_steps", 5, "N.")
    flags.DEFINE_list("schedules", ["800 600 400 199 0", "800 649 449 199 0", "800 649 449 199 28", "999 600 300 100 0",
                                    "900 550 300 120 0"], "Schedules (descending timesteps, space-separated) besides "
                                                          "DDIM-quad.")
    flags.DEFINE_list("visited", [], "search_benchmark JSON files whose winners at N are decomposed.")
    flags.DEFINE_list("visited_rows", [], "Only these row keys of --visited (e.g. N5/seed0/local); [] = every "
                      "local and steps_then_bits winner.")
    flags.DEFINE_list("quad_mixes", ["5/7"], "Uniform W/A mixes scored at DDIM-quad (w/a).")
    flags.DEFINE_list("quad_greedy_a_starts", ["7"], "greedy_bits from these activation widths, at DDIM-quad.")
    flags.DEFINE_list("greedy_budgets", [], "greedy_bits (both activation starts) at DDIM-quad under these fractions of "
                      "the budget, e.g. 1.2,1.4: the quality the greedy rule buys with more BitOPs (how far a target "
                      "at the budget is from what more budget gives).")
    flags.DEFINE_integer("samples", 500, "Probe-noise samples per candidate.")
    flags.DEFINE_integer("probe_seed", 31337, "Seed of the probe noise (used by no search and no benchmark row).")
    flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples.")
    flags.DEFINE_list("fitness_metrics", [], "Fitness metrics shown on the select noise ([] = the config's).")
    flags.DEFINE_integer("fitness_seed", 0, "Noise seed of the select noise on which each row's fitness is shown.")
    flags.DEFINE_string("workdir", "runs/search_benchmark", "Calibration tables (shared with the search benchmark).")
    flags.DEFINE_string("out", "benchmarks/headroom_n5_cpu.json", "Output JSON (rows saved as they finish).")


def check_schedule(space, ts) -> np.ndarray:
    """The schedule's group offsets (`SearchSpace.encode`, whose error names the step and its group)."""
    top = np.full(space.num_sites, space.bit_choices[0])
    return np.asarray(space.encode(ts, top, top).timestep_idx)


def images(ev, row: dict, noise) -> np.ndarray:
    """A panel row's images on `noise`, in [-1, 1]: the FP sampler for 'fp' rows, else the quantized candidate."""
    ts = np.asarray(row["timesteps"])
    if row.get("fp"):
        return ev.sample_fp(ts, noise)
    return ev.sample(ts[None], np.asarray(row["w_bits"])[None], np.asarray(row["a_bits"])[None], noise)[0]


def sharpness(images: np.ndarray) -> float:
    """Mean squared 4-neighbour Laplacian of (n, H, W, C) images: high-frequency energy (blur lowers it)."""
    x = np.asarray(images, np.float64)
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(np.mean(lap ** 2))


def panel(space, greedy_variants: dict, visited_rows: list, chosen: str, schedules: list[str]) -> list[dict]:
    """The candidates (module docstring), one row per distinct candidate; `chosen` names the greedy variant whose
    bits go to each visited winner's schedule."""
    quad = np.asarray(space.timesteps(space.seed()))
    rows = [{"name": "fp@quad", "timesteps": quad, "fp": True}]
    for name, (wb, ab) in greedy_variants.items():
        rows.append({"name": f"{name}@quad", "timesteps": quad, "w_bits": wb, "a_bits": ab})
    for s in schedules:
        ts = np.asarray([int(x) for x in s.split()], np.int64)
        check_schedule(space, ts)
        rows.append({"name": f"fp@{s}", "timesteps": ts, "fp": True})
        for name, (wb, ab) in greedy_variants.items():
            rows.append({"name": f"{name}@{s}", "timesteps": ts, "w_bits": wb, "a_bits": ab})
    gw, ga = greedy_variants[chosen]
    for key, r in visited_rows:
        ts, wb, ab = np.asarray(r["timesteps"]), np.asarray(r["w_bits"]), np.asarray(r["a_bits"])
        if np.array_equal(ts, quad) and np.array_equal(wb, gw) and np.array_equal(ab, ga):
            continue
        rows.append({"name": f"{key}", "timesteps": ts, "w_bits": wb, "a_bits": ab})
        rows.append({"name": f"{key} bits@quad", "timesteps": quad, "w_bits": wb, "a_bits": ab})
        rows.append({"name": f"{chosen}@{key} schedule", "timesteps": ts, "w_bits": gw, "a_bits": ga})
    seen, out = set(), []
    for r in rows:  # one row per distinct candidate (the first name wins)
        k = (tuple(np.asarray(r["timesteps"]).tolist()), r.get("fp", False),
             tuple(np.asarray(r.get("w_bits", [])).tolist()), tuple(np.asarray(r.get("a_bits", [])).tolist()))
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def greedy_budget_rows(space, budget, quad, fractions: list[float]) -> list[dict]:
    """greedy_bits (both activation starts, `run.greedy_variants`; a start over the budget is left out) at DDIM-quad
    under each fraction of `budget` (checked as config.budgets entries: `pareto.budget_limits`)."""
    pareto.budget_limits(fractions, budget.limit, int(budget.cost_of(space.uniform_bits(min(space.bit_choices)))),
                         int(budget.cost_of(space.uniform_bits(max(space.bit_choices)))))
    rows = []
    for f in fractions:
        limit = pareto.entry_limit(f, budget.limit)
        for g, a in run_mod.greedy_variants(space, dataclasses.replace(budget, limit=limit)):
            _, wb, ab = decode_np(space, g)
            if budget.cost(wb, ab) > limit:  # its activation start alone exceeds this budget
                continue
            rows.append({"name": f"greedy_bits(a from {a or space.bit_choices[-1]})@quad, {f:g}x budget",
                         "timesteps": quad, "w_bits": wb, "a_bits": ab})
    return rows


def main(argv):
    del argv
    with sole_writer(FLAGS.out):  # two writers of one --out would lose rows
        extend_out()


def extend_out():
    c = ho.load_config(FLAGS.config, reconstruct=False)
    c.baselines = ()
    problem, work, _, ev = ho.problem_at(c, FLAGS.workdir, FLAGS.num_steps)
    space, budget = problem.space, problem.budget
    variants = {f"greedy_bits(a from {a or space.bit_choices[-1]})": decode_np(space, g)[1:]
                for g, a in run_mod.greedy_variants(space, budget)}  # greedy_finalist's candidates
    visited, chosen = [], next(iter(variants))
    for path in FLAGS.visited:
        for key, r in json.loads(Path(path).read_text())["rows"].items():
            if r.get("num_steps") != FLAGS.num_steps or "w_bits" not in r:
                continue
            if r.get("method", "").startswith(("local", "steps_then_bits")) and (
                    not FLAGS.visited_rows or key in FLAGS.visited_rows):
                visited.append((key, r))
            elif r.get("method", "").startswith("greedy_bits"):  # the variant the benchmark's select noise chose
                chosen = next((k for k, (wb, ab) in variants.items()
                               if wb.tolist() == r["w_bits"] and ab.tolist() == r["a_bits"]), chosen)
    rows = panel(space, variants, visited, chosen, FLAGS.schedules)
    quad = np.asarray(space.timesteps(space.seed()))
    choices = list(space.bit_choices)
    for mix in FLAGS.quad_mixes:
        w, a = (int(x) for x in mix.split("/"))
        if w not in choices or a not in choices:
            raise ValueError(f"--quad_mixes {mix!r}: bits must be among the bit choices {choices}")
        rows.append({"name": f"uniform W{w}A{a}@quad", "timesteps": quad, "w_bits": np.full(space.num_sites, w),
                     "a_bits": np.full(space.num_sites, a)})
    for a in (int(x) for x in FLAGS.quad_greedy_a_starts):
        if a not in choices:
            raise ValueError(f"--quad_greedy_a_starts {a}: must be among the bit choices {choices}")
        _, wb, ab = decode_np(space, budget.greedy_bits(space, a))
        rows.append({"name": f"greedy_bits(a from {a})@quad", "timesteps": quad, "w_bits": wb, "a_bits": ab})
    rows += greedy_budget_rows(space, budget, quad, [float(x) for x in FLAGS.greedy_budgets])
    out_path = Path(FLAGS.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    done = result.setdefault("rows", {})
    noise = NoiseSet(FLAGS.probe_seed, "report", FLAGS.samples)
    scorer = ho.Scorer(c, FLAGS.samples, FLAGS.bootstrap, FLAGS.probe_seed)
    result.update({"command": "python experiments/headroom.py " + " ".join(sys.argv[1:]), "noise": noise.describe(),
                   "reference": "mnist-heldout (500 held-out digits)", "num_steps": FLAGS.num_steps,
                   "budget_bitops": int(budget.limit), "interval": "95% bootstrap percentile, bias-shifted",
                   "machine": machine()})
    print(f"{len(rows)} candidates on {noise.describe()}", flush=True)
    for i, r in enumerate(rows):
        if r["name"] in done:
            continue
        t0 = time.time()
        s = scorer(data.to_unit_range(images(ev, r, noise)), None)
        bitops = None if r.get("fp") else int(budget.cost(r["w_bits"], r["a_bits"]))
        done[r["name"]] = {"timesteps": np.asarray(r["timesteps"]).tolist(), "fp": bool(r.get("fp", False)), "bitops": bitops,
                           "within_budget": None if bitops is None else bool(bitops <= budget.limit),
                           **{k: s[k] for k in ("inception_fid", "classifier_fd")}, "seconds": time.time() - t0}
        print(f"[{i + 1}/{len(rows)}] {r['name']}: Inception FID {s['inception_fid']['value']:.1f}, classifier FD "
              f"{s['classifier_fd']['value']:.1f} ({time.time() - t0:.0f} s)", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
    sel = NoiseSet(FLAGS.fitness_seed, "select", c.select_samples)
    metric_list = ([fit_mod.make_metric(m, c, c.fitness_reference) for m in FLAGS.fitness_metrics]
                   or [run_mod.build_metrics(c).fitness])
    seed_dir = work / f"seed{FLAGS.fitness_seed}"  # the search benchmark's folder of this seed's teachers
    seed_dir.mkdir(parents=True, exist_ok=True)
    teacher = (run_mod.teacher_images(c, problem, ev, sel, seed_dir)
               if any(m.paired for m in metric_list) else None)
    result["select_noise"] = {**sel.describe(), "metrics": [m.name for m in metric_list],
                              "teacher_sharpness": None if teacher is None else sharpness(teacher)}
    for r in rows:  # what the search sees of each row
        row = done[r["name"]]
        todo = [m for m in metric_list if m.name not in row.get("select", {})]
        if not todo:
            continue
        x = images(ev, r, sel)
        scores = ev.score_images(x[None], sel, todo)[0]
        row["select"] = {**row.get("select", {}), **{m.name: float(v) for m, v in zip(todo, scores)},
                         "sharpness": sharpness(x)}
        print(f"{r['name']}: {row['select']}", flush=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
