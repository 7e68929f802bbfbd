"""Throughput of population evaluation: img/s of one UNet forward per candidate, and of whole DDIM runs.

python experiments/bench_population.py --model mnist-small --out benchmarks/population_cpu.json
python experiments/bench_population.py --model sd-1.x --dtype bfloat16 --pop 4 --batch 2 --steps 4 \
    --out benchmarks/population_sd-1.x_<device>.json     # random weights; text model with guidance 7.5

Cases: plain forwards at the total batch P*B ("fp32": the model at --dtype, float32 by default; "bf16"), a
fake-quant single candidate at P*B, and each population strategy (P candidates x B images, weights quantized per
candidate inside the timed call). Each row also gives its ratio to the plain forward at the same total batch. Rows
are written as they finish. Calibration runs only when a quantized case is asked for.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from tmpq_jax import diffusion, models, quant, sampling
from tmpq_jax.benchmark import environment, random_params, timed

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    flags.DEFINE_string("model", "mnist-small", "Model config name.")
    flags.DEFINE_string("out", "benchmarks/population.json", "Output JSON.")
    flags.DEFINE_integer("pop", 8, "Candidates P.")
    flags.DEFINE_integer("batch", 32, "Images per candidate B.")
    flags.DEFINE_integer("repeats", 5, "Timed calls per case (median reported).")
    flags.DEFINE_list("cases", "fp32,bf16,fakequant_single,loop,vmap,map,auto,sample_fp32,sample_auto",
                      "Cases to run, in order. sample_* time a whole --steps DDIM run (weights quantized once per "
                      "run, as in the search) and compare with sample_fp32.")
    flags.DEFINE_integer("steps", 10, "DDIM steps of the sample_* cases.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Model and params dtype of every case but bf16 "
                      "(which is always bfloat16).")
    flags.DEFINE_enum("init", "auto", ["auto", "model", "random"], "Params: the model's initialisers ('model'), or "
                      "scaled random normals from `jax.eval_shape` shapes ('random': no init compile, for 860M-param "
                      "UNets); 'auto' = random above 100M params.")


def main(argv):
    del argv
    spec = models.get_spec(FLAGS.model)
    dtype = jnp.dtype(FLAGS.dtype)
    model = models.build_model(spec, dtype=dtype)
    model16 = models.build_model(spec, dtype=jnp.bfloat16)
    shapes = models.param_shapes(spec)
    big = models.count_params(shapes) > 100e6
    if FLAGS.init == "random" or (FLAGS.init == "auto" and big):
        params = random_params(shapes, jax.random.key(0), dtype)
    else:
        params = jax.tree.map(lambda a: a.astype(dtype), models.init_params(spec, jax.random.key(0)))
    print(f"{spec.name}: {models.count_params(params):,} params ({FLAGS.dtype}) on {jax.devices()[0].device_kind}",
          flush=True)
    p, b = FLAGS.pop, FLAGS.batch
    n = p * b

    def apply_fn(prm, *a):
        return model.apply({"params": prm}, *a)

    sites = quant.discover_sites(apply_fn, shapes, models.example_inputs(spec))
    x = jax.random.normal(jax.random.key(1), (n, *spec.sample_shape)).astype(dtype)
    t = jnp.full((n,), 500, jnp.int32)
    y = jnp.arange(n, dtype=jnp.int32) % max(spec.num_classes, 1)
    calib = (x[: min(n, 64)], t[: min(n, 64)], y[: min(n, 64)])
    calibrated = {}

    def tables_():  # calibrated only when a quantized case runs
        if "t" not in calibrated:
            calibrated["t"] = quant.calibrate(apply_fn, params, sites, [calib], [8, 7, 6, 5], num_batches=1)
        return calibrated["t"]
    rng = np.random.default_rng(0)
    w_pop = jnp.asarray(rng.choice([8, 7, 6, 5], (p, len(sites))), jnp.int32)
    a_pop = jnp.asarray(rng.choice([8, 7, 6, 5], (p, len(sites))), jnp.int32)
    xs, ts, ys = (a.reshape(p, b, *a.shape[1:]) for a in (x, t, y))

    def candidate_forward(w_bits, a_bits, x, t, y, params, tables):
        cand = quant.gather_candidate(tables, sites, w_bits, a_bits)
        return quant.quantized_apply(apply_fn, sites, cand)(quant.quantize_params(params, sites, cand), x, t, y)

    def plain(prm, x, t, y):
        return model.apply({"params": prm}, x, t, y)

    def plain16(prm, x, t, y):
        return model16.apply({"params": prm}, x, t, y)

    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    runners = {
        "fp32": lambda: (jax.jit(plain), (params, x, t, y)),
        "bf16": lambda: (jax.jit(plain16), (params16, x.astype(jnp.bfloat16), t, y)),
        "fakequant_single": lambda: (jax.jit(candidate_forward), (w_pop[0], a_pop[0], x, t, y, params, tables_())),
    }
    for strategy in quant.STRATEGIES:
        if strategy == "sharded" and jax.device_count() == 1:
            continue

        def make(strategy=strategy):
            fn = quant.population_fn(lambda w, a, xx, tt, yy, prm, tab: candidate_forward(w, a, xx, tt, yy, prm, tab),
                                     strategy)
            return (lambda pop, shared: fn(pop, shared)), ((w_pop, a_pop, xs, ts, ys), (params, tables_()))

        runners[strategy] = make

    # whole sampling runs: what one search evaluation costs per image
    abar = jnp.asarray(spec.schedule.alphas_cumprod(), jnp.float32)
    steps = jnp.asarray(diffusion.quad_timesteps(FLAGS.steps, spec.schedule.num_train_timesteps), jnp.int32)
    kw = spec.schedule.sampler_kwargs()
    runners["sample_fp32"] = lambda: (jax.jit(lambda prm, noise, yy: diffusion.ddim_sample(
        lambda xx, tt, yyy: plain(prm, xx, tt, yyy), abar, steps, noise, yy, **kw)), (params, x, y))
    for strategy in quant.STRATEGIES:
        if strategy == "sharded" and jax.device_count() == 1:
            continue

        def make_sampler(strategy=strategy):
            sampler = sampling.make_population_sampler(apply_fn, sites, strategy, sampler_kwargs=kw)
            pop = (w_pop, a_pop, jnp.tile(steps, (p, 1)))
            return (lambda pop, shared: sampler(pop, shared)), (pop, (abar, params, tables_(), xs[0], ys[0]))

        runners[f"sample_{strategy}"] = make_sampler
    rows, plain_ips = [], {}  # the fp32 img/s each row is compared with: per forward and per sampling run
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**environment(), "model": spec.name, "params": models.count_params(params), "dtype": FLAGS.dtype,
            "unet_passes_per_step": spec.unet_passes_per_step, "sites": len(sites),
            "macs_per_image": int(sites.macs.sum()), "P": p, "B": b,
            "auto_strategy": quant.auto_strategy()}
    print(f"{'case':18s} {'img/s':>10s} {'vs fp32':>8s} {'compile s':>9s}")
    for case in FLAGS.cases:
        if case not in runners:
            continue
        fn, args = runners[case]()
        sec, compile_s = timed(fn, *args, repeats=FLAGS.repeats)
        ips = n / sec
        if case in ("fp32", "sample_fp32"):
            plain_ips[case] = ips
        base = plain_ips.get("sample_fp32" if case.startswith("sample_") else "fp32")
        row = {"case": case, "img_per_s": ips, "seconds": sec, "compile_seconds": compile_s,
               "ratio_to_fp32": ips / base if base else None, "total_batch": n,
               "steps": FLAGS.steps if case.startswith("sample_") else 1}
        rows.append(row)
        print(f"{case:18s} {ips:10.1f} {row['ratio_to_fp32'] or float('nan'):8.2f} {compile_s:9.1f}", flush=True)
        out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
