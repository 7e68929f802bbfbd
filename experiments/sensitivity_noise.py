"""Is the knapsack start limited by the noise of its sensitivities? (issue 17)

The search benchmark's knapsack start varies by seed (its sensitivities are fitness damages on 8 samples of each
seed's fitness noise). This diagnostic reads the three seeds' cached sensitivities of a benchmark workdir and
reports (1) how well they agree (Spearman rank correlation of the probed damages, seed against seed), and (2) the
knapsack optima of their mean (24 samples, from three fitness noise sets; 3x one seed's probe runs, which still
fits a method's 150 runs: 3 x 41 + 3), each seed's select noise choosing among them as the benchmark's winner
re-scoring does, and every optimum scored held-out (report noise no search used) against the held-out digits,
next to `greedy_bits` of the same benchmark JSON.

python experiments/sensitivity_noise.py --num_steps 10,5 --workdir runs/search_benchmark_o1 \
    --benchmark benchmarks/search_benchmark_o1_cpu.json --out benchmarks/sensitivity_noise_cpu.json
python experiments/sensitivity_noise.py --agreement_only --num_steps 10,5 --workdir runs/search_benchmark_dev \
    --config experiments/configs/search_benchmark_deviation.py \
    --out benchmarks/sensitivity_agreement_deviation_cpu.json       # the deviation tables' measured entries' agreement
python experiments/sensitivity_noise.py --agreement_only --num_steps 10 --seeds 0 \
    --config experiments/configs/search_benchmark_onestep_allbits.py --workdir runs/search_benchmark_onestep_allbits \
    --out benchmarks/sensitivity_bit_scaling_onestep_cpu.json        # how the damage scales with bits
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax.cpu_flags import apply_cpu_xla_flags  # noqa: E402
apply_cpu_xla_flags()  # before JAX starts
from experiments import heldout as ho  # noqa: E402
from tmpq_jax import data  # noqa: E402
from tmpq_jax.benchmark import machine  # noqa: E402
from tmpq_jax.search import run as run_mod, sensitivity  # noqa: E402
from tmpq_jax.search.driver import decode_np, stack_genomes  # noqa: E402
from tmpq_jax.search.fitness import NoiseSet  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    flags.DEFINE_string("config", "experiments/configs/search_benchmark_base.py", "The benchmark's base config.")
    flags.DEFINE_list("num_steps", ["10", "5"], "N values.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Benchmark seeds whose sensitivities are pooled.")
    flags.DEFINE_string("workdir", "runs/search_benchmark_o1", "The search benchmark's workdir (tables, teachers).")
    flags.DEFINE_string("method_dir", "knapsack^teacher_inception", "Row directory holding sensitivities.npz.")
    flags.DEFINE_string("select_metric", "teacher_inception", "Metric choosing among the optima on each seed's select "
                        "noise.")
    flags.DEFINE_string("benchmark", "benchmarks/search_benchmark_o1_cpu.json", "Benchmark JSON with greedy_bits rows.")
    flags.DEFINE_integer("heldout_samples", 500, "Report-noise samples per held-out score.")
    flags.DEFINE_integer("heldout_seed", 7, "Seed of the report noise (no search uses it).")
    flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples.")
    flags.DEFINE_string("out", "benchmarks/sensitivity_noise_cpu.json", "Output JSON.")
    flags.DEFINE_bool("agreement_only", False, "Only the seeds' rank agreement (no knapsack, no sampling).")


def rank_agreement(tables: list[np.ndarray], measured: np.ndarray | None = None) -> dict:
    """Spearman correlation of the damages, for every pair of seeds: of the `measured` entries (probed sites at
    probed bits), or of every entry non-zero in some seed (modeled ones included: the 4^-b interpolation and the
    MAC scale model rank alike in every seed, which inflates the agreement)."""
    mask = np.any(np.stack([t != 0 for t in tables]), axis=0) if measured is None else measured
    out = {}
    for i in range(len(tables)):
        for j in range(i + 1, len(tables)):
            out[f"{i}-{j}"] = float(stats.spearmanr(tables[i][mask], tables[j][mask]).statistic)
    return out


def measured_entries(c, budget) -> tuple[np.ndarray, np.ndarray]:
    """(L, B) bool masks of the w and a damage entries a probe measured under config `c`."""
    shape = (len(budget.macs), len(budget.bit_choices))
    masks = {"w": np.zeros(shape, bool), "a": np.zeros(shape, bool)}
    for p in sensitivity.probes(budget, c.sensitivity_probe_bits, c.sensitivity_mac_share):
        masks[p.operand][p.site, p.bit_idx] = True
    return masks["w"], masks["a"]


def bit_scaling(tables: list[np.ndarray], measured: np.ndarray, bit_choices) -> dict:
    """How measured damage scales with bits: for each probed choice above the lowest probed one, the quartiles of
    damage(b) / damage(lowest) over the sites where both were measured (every seed's table), next to the 4^-b
    model's ratio (`sensitivity.damage_tables` interpolates unprobed choices by it)."""
    bits = np.asarray(bit_choices, np.float64)
    cols = [j for j in range(1, len(bits)) if measured[:, j].any()]
    low = min(cols, key=lambda j: bits[j])
    noise = 4.0 ** -bits
    out = {}
    for j in cols:
        if j == low:
            continue
        rows = measured[:, j] & measured[:, low]
        ok = [rows & (t[:, low] > 0) for t in tables]  # a non-positive lowest-bit damage has no ratio
        r = np.concatenate([t[m, j] / t[m, low] for t, m in zip(tables, ok)])
        if len(r):
            out[f"{int(bits[j])}_over_{int(bits[low])}"] = {
                "quartiles": [float(q) for q in np.percentile(r, [25, 50, 75])], "n": int(len(r)),
                "model": float((noise[j] - noise[0]) / (noise[low] - noise[0]))}
    return out


def main(argv):
    del argv
    out_path = Path(FLAGS.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    bench = json.loads(Path(FLAGS.benchmark).read_text())["rows"]
    seeds = [int(s) for s in FLAGS.seeds]
    for n in (int(x) for x in FLAGS.num_steps):
        t0 = time.time()
        c0 = ho.load_config(FLAGS.config, reconstruct=False)
        c0.select_metric = FLAGS.select_metric
        problem, work, tables, ev = ho.problem_at(c0, FLAGS.workdir, n)
        space = problem.space
        sens = []
        for s in seeds:
            with np.load(work / f"seed{s}" / FLAGS.method_dir / "sensitivities.npz") as z:
                sens.append((z["w_damage"], z["a_damage"], int(z["runs"])))
        mw, ma = measured_entries(c0, problem.budget)
        agreement = {"weights": rank_agreement([w for w, _, _ in sens], mw),
                     "activations": rank_agreement([a for _, a, _ in sens], ma),
                     "both": rank_agreement([np.concatenate([w, a]) for w, a, _ in sens], np.concatenate([mw, ma])),
                     "both_with_modeled_entries": rank_agreement([np.concatenate([w, a]) for w, a, _ in sens])}
        print(f"N={n}: Spearman of the seeds' measured damages {agreement['both']} (with the modeled entries "
              f"{agreement['both_with_modeled_entries']})", flush=True)
        negative = [int((w < 0).sum() + (a < 0).sum()) for w, a, _ in sens]
        if FLAGS.agreement_only:
            result[f"N{n}"] = {"seeds": seeds, "rank_agreement": agreement, "negative_entries": negative}
            if len(c0.sensitivity_probe_bits) > 1:
                scaling = {"weights": bit_scaling([w for w, _, _ in sens], mw, space.bit_choices),
                           "activations": bit_scaling([a for _, a, _ in sens], ma, space.bit_choices)}
                print(f"N={n}: measured damage ratios {scaling}", flush=True)
                result[f"N{n}"]["bit_scaling"] = scaling
            result.update({"command": " ".join(sys.argv), "workdir": FLAGS.workdir, "method_dir": FLAGS.method_dir})
            out_path.write_text(json.dumps(result, indent=1))
            continue
        # the pooled tables were scored on three noise sets; `noise` only describes them (the knapsack ignores it)
        pooled = run_mod.Sensitivities(np.mean([w for w, _, _ in sens], 0), np.mean([a for _, a, _ in sens], 0),
                                       sum(r for _, _, r in sens), NoiseSet(seeds[0], "fitness", 0))
        optima = run_mod.knapsack_start(c0, problem, pooled)
        pop = stack_genomes(optima)
        ts, wb, ab = decode_np(space, pop)
        scorer = ho.Scorer(c0, FLAGS.heldout_samples, FLAGS.bootstrap, FLAGS.heldout_seed)
        report = NoiseSet(FLAGS.heldout_seed, "report", FLAGS.heldout_samples)
        held = []
        for i in range(len(optima)):
            unit = data.to_unit_range(ev.sample(ts[i:i + 1], wb[i:i + 1], ab[i:i + 1], report)[0])
            out = scorer(unit, None)
            held.append({k: out[k] for k in ("inception_fid", "classifier_fd")})
            print(f"N={n} pooled optimum {i} (weights' share {c0.knapsack_weights[i]}): "
                  f"{ {k: round(v['value'], 2) for k, v in held[-1].items()} }", flush=True)
        per_seed = {}
        for s in seeds:
            c = c0.copy_and_resolve_references()
            c.seed, c.noise_seed = s, s
            run_mod.make_teachers(c, problem, ev, run_mod.build_metrics(c), work / f"seed{s}")
            sel = run_mod.score_on(c, ev, space, pop, "select", run_mod.build_metrics(c).selection)
            i = int(np.argmin(sel))
            greedy = bench[f"N{n}/seed{s}/greedy_bits^{FLAGS.select_metric}"]["heldout"]
            per_seed[str(s)] = {
                "select_scores": [float(x) for x in sel], "chosen": i,
                "heldout": held[i],
                "ratio_to_greedy": {m: held[i][m]["value"] / greedy[m]["value"] for m in held[i]},
                "greedy_bits_heldout": greedy}
            print(f"N={n} seed {s}: select picks optimum {i}: ratio to greedy_bits "
                  f"{ {m: round(v, 3) for m, v in per_seed[str(s)]['ratio_to_greedy'].items()} }", flush=True)
        result[f"N{n}"] = {
            "seeds": seeds, "sensitivity_samples_each": c0.sensitivity_samples,
            "probe_runs_each": [r for _, _, r in sens], "rank_agreement": agreement, "negative_entries": negative,
            "optima": [{"knapsack_weight": float(wt), "w_bits": wb[i].tolist(), "a_bits": ab[i].tolist(),
                        "bitops": int(problem.budget.cost(wb[i], ab[i])), "heldout": held[i]}
                       for i, wt in enumerate(c0.knapsack_weights)],
            "per_seed": per_seed, "seconds": time.time() - t0}
        result.update({"command": " ".join(sys.argv), "machine": machine(),
                       "heldout_noise": report.describe(), "reference": "mnist-heldout (500 held-out digits)",
                       "interval": "95% bootstrap percentile, bias-shifted"})
        out_path.write_text(json.dumps(result, indent=1))
        print(f"wrote {out_path}", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
