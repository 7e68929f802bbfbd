"""The calibration benchmark: uniform WxAy candidates under each calibration stage, against FP32 at the same steps.

Stages (each adds one technique to the one before; README "Calibration"):
  mse      one activation range per site for every t, from 20 uniform FP steps; MSE clipping (the old default)
  groups   + ranges per timestep group, from trajectories of the DDIM-quad seed and random one-per-group schedules
  split    + separate ranges for the up-path and skip channels of up blocks' shortcut inputs
  learned  + learned rounding and activation step sizes per block and bit-width (AdaRound / BRECQ)
  first_last          split, with the first and last layer (conv_in, conv_out) at W8A8
  first_last_learned  learned, with the first and last layer at W8A8
  unclipped           first_last, with the transformers' ff/net_2 inputs at their min/max (no clipping; the default)
  unclipped6          unclipped at 6 bits and more only (5-bit ranges of those inputs searched as in first_last)
The first four stages quantize the first and last layer like every other site (first_last_bits=0).

Every row is sampled on held-out report noise (`--noise_seed`, purpose 'report', which no search uses) and scored
against the report reference (the 500 held-out digits): Inception FID and classifier FD with 95% bootstrap
intervals, and teacher MSE to FP32 at the same steps and noise. Rows are saved as they finish and reused while
their calibration settings (the tables' cache key) are unchanged.

python experiments/quant_quality.py --num_samples 500 --noise_seed 7 --schedules quad10,uniform100 \
    --out benchmarks/calibration_mnist-small_cpu.json
"""

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax.cpu_flags import apply_cpu_xla_flags, backend_opt_level  # noqa: E402
apply_cpu_xla_flags()  # before JAX starts: LLVM -O1 on CPU-only machines (tmpq_jax/cpu_flags.py)
from experiments import heldout  # noqa: E402
from tmpq_jax import data, diffusion, quant  # noqa: E402
from tmpq_jax.benchmark import machine, sole_writer  # noqa: E402
from tmpq_jax.search import run as run_mod  # noqa: E402
from tmpq_jax.search.cache import cache_tag  # noqa: E402
from tmpq_jax.search.fitness import NoiseSet  # noqa: E402

_GROUPS = dict(calib_trajectories="candidates", calib_ranges="per_group", split_skip=False, reconstruct=False,
               first_last_bits=0, unclipped_sites=(), unclipped_min_bits=2)
_SPLIT = {**_GROUPS, "split_skip": True}
_LEARNED = {**_SPLIT, "reconstruct": True}
STAGES = {
    "mse": {**_GROUPS, "calib_trajectories": "uniform", "calib_ranges": "shared"},
    "groups": _GROUPS,
    "split": _SPLIT,
    "learned": _LEARNED,
    "first_last": {**_SPLIT, "first_last_bits": 8},
    "first_last_learned": {**_LEARNED, "first_last_bits": 8},
    "unclipped": {**_SPLIT, "first_last_bits": 8, "unclipped_sites": ("ff/net_2$",)},
    "unclipped6": {**_SPLIT, "first_last_bits": 8, "unclipped_sites": ("ff/net_2$",), "unclipped_min_bits": 6},
}
METRICS = ("inception_fid", "classifier_fd", "teacher_mse")

FLAGS = flags.FLAGS


def define_flags():
    """The script's flags (defined only when run as a script, so tests can import it next to other scripts)."""
    flags.DEFINE_string("config", "experiments/configs/default.py", "Search config (model, checkpoint, calibration).")
    flags.DEFINE_list("stages", list(STAGES), f"Calibration stages, from {list(STAGES)}.")
    flags.DEFINE_list("schedules", ["quad10", "uniform100"], "quadN: DDIM-quad (the space's seed) at N = num_steps; "
                      "uniformN: N uniform steps.")
    flags.DEFINE_list("bits", ["8/8", "7/7", "6/6", "5/6", "6/5", "5/5", "7/5"], "Uniform w/a bit-widths.")
    flags.DEFINE_list("bits_100", [], "Bit-widths at schedules of more than 20 steps (default: --bits).")
    flags.DEFINE_list("only", [], "NAME=REGEX: also rows with --bits only at the sites whose path matches REGEX and "
                      "W8A8 elsewhere (where a bit-width costs), keyed '<schedule>/<stage>/w<W>a<A>@NAME'.")
    flags.DEFINE_integer("num_samples", 500, "Samples per row (held-out report noise).")
    flags.DEFINE_integer("noise_seed", 7, "Seed of the report noise (the search reports on config.report_noise_seed).")
    flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the 95% intervals.")
    flags.DEFINE_string("workdir", "runs/calibration", "Tables (one folder per stage) and sampled rows.")
    flags.DEFINE_string("out", "benchmarks/calibration_mnist-small_cpu.json", "Output JSON.")
    flags.DEFINE_bool("sample_only", False, "Calibrate and sample every row into --workdir without scoring (e.g. on "
                      "an accelerator without the Inception weights); a later run on that workdir scores the saved "
                      "images.")


def load_config(path: str, stage: str):
    return heldout.load_config(path, **STAGES[stage])


def schedule(name: str, problem) -> np.ndarray:
    if name.startswith("quad"):
        n = int(name[4:])
        if n != problem.space.num_steps:
            raise ValueError(f"--schedules {name}: the space has num_steps={problem.space.num_steps}")
        return np.asarray(problem.space.timesteps(problem.space.seed()))
    if name.startswith("uniform"):
        return diffusion.uniform_timesteps(int(name[7:]), problem.spec.schedule.num_train_timesteps)
    raise ValueError(f"unknown schedule {name!r}; valid: quadN, uniformN")


def parse_only(entries) -> list[tuple[str, str]]:
    """--only NAME=REGEX entries -> [(name, regex)]; ValueError on a malformed entry or regex."""
    out = []
    for e in entries:
        name, sep, pattern = e.partition("=")
        if not sep or not name or not pattern:
            raise ValueError(f"--only {e!r}: expected NAME=REGEX, e.g. conv_in=conv_in$")
        re.compile(pattern)
        out.append((name, pattern))
    return out


def row_bits(paths, w: int, a: int, pattern: str | None):
    """(w_bits (1, L), a_bits (1, L), the sites that take w / a): WwAa at every site (pattern None) or only at the
    sites whose path matches `pattern`, W8A8 elsewhere. Pinned sites (rules) keep their pins when sampled."""
    hit = np.array([pattern is None or re.search(pattern, p) is not None for p in paths])
    return np.where(hit, w, 8)[None].astype(np.int32), np.where(hit, a, 8)[None].astype(np.int32), hit


def parse_bits(s: str) -> tuple[int, int]:
    w, a = (int(x) for x in s.split("/"))
    return w, a


def main(argv):
    del argv
    with sole_writer(FLAGS.out):  # two writers of one --out would lose rows
        extend_out()


def extend_out():
    only = parse_only(FLAGS.only)  # before any calibration
    out_path = Path(FLAGS.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    rows = result.get("rows", {})
    noise_set = NoiseSet(FLAGS.noise_seed, "report", FLAGS.num_samples)
    work = Path(FLAGS.workdir)
    scorer = None
    fp_images: dict[str, np.ndarray] = {}
    for stage in FLAGS.stages:
        c = load_config(FLAGS.config, stage)
        c.bit_choices = tuple(sorted({*c.bit_choices, *(b for s in FLAGS.bits for b in parse_bits(s))}, reverse=True))
        run_mod.validate_config(c)
        problem = run_mod.build_problem(c)
        (work / stage).mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        tables = run_mod.calibrate(c, problem, work / stage)
        meta = json.loads((work / stage / "quant_tables.json").read_text())
        result.setdefault("calibration_seconds", {})[stage] = meta.get("seconds", time.time() - t0)
        calib = cache_tag(meta["cache_key"])  # the calibration settings a row was sampled under
        evaluator = run_mod.make_evaluator(c, problem, tables)
        if not FLAGS.sample_only:
            scorer = scorer or heldout.Scorer(c, FLAGS.num_samples, FLAGS.bootstrap, FLAGS.noise_seed)
        for sched_name in FLAGS.schedules:
            ts = schedule(sched_name, problem)
            if sched_name not in fp_images:
                fp_images[sched_name] = images_for(work / f"fp32_{sched_name}.npz",
                                                   lambda: evaluator.sample_fp(ts, noise_set),
                                                   {"model": problem.checkpoint_sha, "noise": noise_set.describe(),
                                                    "timesteps": ts.tolist(),
                                                    "xla_backend_optimization_level": backend_opt_level()})
                key = f"{sched_name}/fp32"
                if key not in rows and not FLAGS.sample_only:
                    rows[key] = {"schedule": sched_name, "timesteps": ts.tolist(), "bits": "fp32",
                                 **scorer(fp_images[sched_name], fp_images[sched_name])}
                    save(out_path, result, rows)
            bit_list = FLAGS.bits_100 if (len(ts) > 20 and FLAGS.bits_100) else FLAGS.bits
            for bits, (part, pattern) in [(b, o) for b in bit_list for o in [(None, None), *only]]:
                at = f"@{part}" if part else ""
                key = f"{sched_name}/{stage}/w{bits.replace('/', 'a')}{at}"
                if key in rows and rows[key].get("calibration") == calib and not FLAGS.sample_only:
                    continue
                if key in rows:
                    print(f"{key}: sampled under other calibration settings; resampling", flush=True)
                w, a = parse_bits(bits)
                wv, av, hit = row_bits(problem.sites.paths, w, a, pattern)
                t1 = time.time()
                unit = images_for(work / stage / f"{sched_name}_w{w}a{a}{at.replace('@', '_at_')}.npz",
                                  lambda: evaluator.sample(ts[None], wv, av, noise_set)[0],
                                  {"tables": meta["sha256"], "noise": noise_set.describe(), "timesteps": ts.tolist(),
                                   "bits": [w, a], "sample_batch": c.sample_batch,
                                   "xla_backend_optimization_level": backend_opt_level(),
                                   **({"only": pattern} if part else {})})
                if FLAGS.sample_only:
                    print(f"{key}: sampled in {time.time() - t1:.0f} s", flush=True)
                    continue
                rows[key] = {"schedule": sched_name, "stage": stage, "bits": f"W{w}A{a}", "calibration": calib,
                             **({"only": {"name": part, "pattern": pattern, "sites": int(hit.sum()),
                                          "elsewhere": "W8A8"}} if part else {}),
                             "bitops": quant.bitops(problem.sites, wv[0], av[0], len(ts)),
                             "sample_seconds": time.time() - t1, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                             **scorer(unit, fp_images[sched_name])}
                print(key, {m: rows[key][m]["value"] for m in METRICS}, flush=True)
                save(out_path, result, rows)
    if not FLAGS.sample_only:
        save(out_path, result, rows)


def images_for(path: Path, sample, key: dict) -> np.ndarray:
    """Unit-range images, sampled once and kept in `path` with their key (tables digest, noise, schedule, bits)."""
    key = json.dumps(key, sort_keys=True)
    if path.is_file():
        with np.load(path) as z:
            if str(z["key"]) == key:
                return np.asarray(z["images"])
    unit = data.to_unit_range(sample())
    np.savez(path, images=unit, key=np.asarray(key))
    return unit


def save(out_path: Path, result: dict, rows: dict) -> None:
    result.update({
        "model": "mnist-small (config: " + FLAGS.config + ")",
        **{"noise": NoiseSet(FLAGS.noise_seed, "report", FLAGS.num_samples).describe()},
        "reference": "mnist-heldout (500 held-out digits)",
        "teacher_mse": "per-sample pixel MSE ([-1, 1]) to FP32 at the same schedule and noise",
        "interval": "95% bootstrap percentile interval over noise rows, bias-shifted",
        "stages": {k: STAGES[k] for k in STAGES},
        "note": "attention probabilities stay at 8 bits (default rule), and in the first_last stages the first and "
                "last layer (conv_in, conv_out) at W8A8; W and A bits uniform over all other sites (rows with 'only': "
                "at the sites it names, W8A8 elsewhere)",
        "machine": machine(),
        "command": "python experiments/quant_quality.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    })
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
