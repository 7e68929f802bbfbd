"""Quality of uniform WxAx fake quantization on a checkpoint, against FP, at the same steps and noise.

python experiments/quant_quality.py --num_samples 300 --steps 100 --bits 8,5 --out benchmarks/quant_quality_mnist-small.json
"""

import json
import os
import sys
import time
from pathlib import Path

import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax import diffusion, quant  # noqa: E402
from tmpq_jax.search import run as run_mod  # noqa: E402
from tmpq_jax.search.fitness import NoiseSet, make_metric  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "experiments/configs/default.py", "Search config (model, checkpoint, calibration).")
flags.DEFINE_integer("num_samples", 300, "Samples per setting (same noise for all).")
flags.DEFINE_integer("steps", 100, "DDIM steps (uniform).")
flags.DEFINE_list("bits", ["8", "5"], "Uniform bit-widths to test (weights and activations).")
flags.DEFINE_string("workdir", "runs/quant_quality", "Where calibration tables are cached.")
flags.DEFINE_string("out", "benchmarks/quant_quality_mnist-small.json", "Output JSON.")


def main(argv):
    del argv
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("cfg", FLAGS.config)
    cfg = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(cfg)
    c = cfg.get_config()
    c.bit_choices = tuple(sorted({*c.bit_choices, *(int(b) for b in FLAGS.bits)}, reverse=True))
    problem = run_mod.build_problem(c)
    workdir = Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tables = run_mod.calibrate(c, problem, workdir)
    ev = run_mod.make_evaluator(c, problem, tables)
    metric = make_metric(c.report_metrics[0], c, c.report_reference)
    noise_set = NoiseSet(c.report_noise_seed, "report", FLAGS.num_samples)
    ts = diffusion.uniform_timesteps(FLAGS.steps)
    rows = {}
    t0 = time.time()
    rows["fp32"] = {"metric": metric(ev.sample_fp(ts, noise_set)), "seconds": time.time() - t0}
    print("fp32", rows["fp32"], flush=True)
    for b in FLAGS.bits:
        t0 = time.time()
        b = int(b)
        bits = jnp.full((1, len(problem.sites)), b, jnp.int32)
        images = ev.sample(jnp.asarray(ts)[None], bits, bits, noise_set)[0]
        rows[f"w{b}a{b}"] = {"metric": metric(images), "seconds": time.time() - t0,
                             "bitops": quant.bitops(problem.sites, bits[0], bits[0], FLAGS.steps)}
        print(f"w{b}a{b}", rows[f"w{b}a{b}"], flush=True)
    out = {"model": problem.spec.name, "metric": metric.name, "reference": c.report_reference,
           "ddim_steps": FLAGS.steps, **noise_set.describe(),
           "note": "attention probabilities stay at 8 bits (default rule)",
           "command": "python experiments/quant_quality.py " + " ".join(sys.argv[1:]), "rows": rows}
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
