"""Is probing only the largest sites (config.sensitivity_mac_share) a faithful cheaper estimate? (issue 17, item 1)

Probes every searched operand of every site once (mac_share 1, the full table), then rebuilds the table from the
subset of those same probe scores that each --shares value would have measured (no extra sampler runs), and
compares: the Spearman rank correlation of the modelled damage of the unprobed sites with their measured damage,
the rank correlation over all sites, and the exact knapsack optimum of each table scored by the fitness on the
fitness noise (the same noise the probes used, n = config.search_samples).

python experiments/sensitivity_check.py --shares 0.8,0.9,0.95 --out benchmarks/sensitivity_share_cpu.json
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax.cpu_flags import apply_cpu_xla_flags  # noqa: E402
apply_cpu_xla_flags()  # before JAX starts: LLVM -O1 on CPU-only machines (tmpq_jax/cpu_flags.py)
from experiments import heldout as ho  # noqa: E402
from tmpq_jax.search import knapsack, sensitivity  # noqa: E402
from tmpq_jax.search import run as run_mod  # noqa: E402
from tmpq_jax.search.driver import decode_np  # noqa: E402
from tmpq_jax.search.fitness import NoiseSet, nan_to_inf  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    flags.DEFINE_string("config", "experiments/configs/default.py", "Config (model, calibration, fitness).")
    flags.DEFINE_integer("num_steps", 10, "N.")
    flags.DEFINE_list("shares", ["0.8", "0.9", "0.95"], "mac_share values to compare with the full table.")
    flags.DEFINE_string("workdir", "runs/search_benchmark", "Tables and teachers (shared with search_benchmark.py).")
    flags.DEFINE_string("out", "benchmarks/sensitivity_share_cpu.json", "Output JSON.")


def main(argv):
    del argv
    c = ho.load_config(FLAGS.config, reconstruct=False)
    c.sensitivity_mac_share = 1.0
    problem, work, _, ev = ho.problem_at(c, FLAGS.workdir, FLAGS.num_steps)
    metrics = run_mod.build_metrics(c)
    run_mod.make_teachers(c, problem, ev, metrics, work / "seed0")
    t0 = time.time()
    full = run_mod.site_sensitivities(c, problem, ev, metrics.fitness, work / "seed0")
    budget, space = problem.budget, problem.space
    plist = sensitivity.probes(budget, c.sensitivity_probe_bits)
    # the probe scores back from the full table: damage + all-top score (the same score minus the same constant)
    probe_damage = np.asarray([(full.w_damage if p.operand == "w" else full.a_damage)[p.site, p.bit_idx]
                               for p in plist])
    fitness = NoiseSet(c.noise_seed, "fitness", c.search_samples)

    def knapsack_fitness(wd, ad):
        genomes, sols = knapsack.knapsack_genomes(budget, space, wd, ad, (0.5,))
        pop = jax.tree.map(lambda x: np.asarray(x)[None], genomes[0])
        f = nan_to_inf(ev.evaluate(*decode_np(space, pop), fitness, [metrics.fitness])[:, 0])[0]
        return float(f), int(sols[0].cost)

    out = {"config": FLAGS.config, "num_steps": FLAGS.num_steps, "metric": metrics.fitness.name,
           "probe_noise": full.noise.describe(), "knapsack_fitness_noise": fitness.describe(),
           "full": {"probes": len(plist), "runs": full.runs}, "shares": {}}
    out["full"]["knapsack_fitness"], out["full"]["knapsack_bitops"] = knapsack_fitness(full.w_damage, full.a_damage)
    top = np.asarray(space.bit_choices).tolist().index(min(c.sensitivity_probe_bits))
    for share in (float(s) for s in FLAGS.shares):
        keep = sensitivity.probed_sites(budget, share)
        sub = [(p, d) for p, d in zip(plist, probe_damage) if keep[p.site]]
        wd, ad = sensitivity.damage_tables(budget, [p for p, _ in sub], [d for _, d in sub], 0.0)
        row = {"probed_sites": int(keep.sum()), "probes": len(sub),
               "runs": len(sub) * c.sensitivity_samples / c.search_samples}
        for name, got, want, fixed in (("w", wd, full.w_damage, budget.fixed_w), ("a", ad, full.a_damage,
                                                                                   budget.fixed_a)):
            searched = np.asarray(fixed) == 0
            unp = searched & ~keep
            row[f"{name}_spearman_unprobed"] = (float(spearmanr(got[unp, top], want[unp, top]).statistic)
                                                if unp.sum() > 2 else None)
            row[f"{name}_spearman_all"] = float(spearmanr(got[searched, top], want[searched, top]).statistic)
        row["knapsack_fitness"], row["knapsack_bitops"] = knapsack_fitness(wd, ad)
        out["shares"][str(share)] = row
        print(share, row, flush=True)
    greedy = budget.greedy_bits(space)
    pop = jax.tree.map(lambda x: np.asarray(x)[None], greedy)
    out["greedy_bits_fitness"] = float(nan_to_inf(ev.evaluate(*decode_np(space, pop), fitness,
                                                              [metrics.fitness])[:, 0])[0])
    out.update(seconds=time.time() - t0, budget_bitops=budget.limit,
               machine=f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind}",
               command="python experiments/sensitivity_check.py " + " ".join(sys.argv[1:]))
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    define_flags()
    app.run(main)
