"""What a shipped candidate saves: file size, parameter bytes on the device, XLA's compiled memory, and latency.

python experiments/bench_deploy.py --exports best=runs/default/export_best,uniform_w8a8=runs/default/export_w8a8 \
    --out benchmarks/deploy_mnist-small_cpu.json
python experiments/bench_deploy.py --random ddpm-cifar10-32,sd-1.x --out benchmarks/deploy_shapes_<device>.json

For each quantized checkpoint (`--exports name=DIR`, written by experiments/export.py) and, with `--random`, for
model shapes with random weights (a uniform W8A8 candidate with abs-max clips and fixed activation ranges: the
numbers are costs, not quality), rows for FP32 (the float model), `dequant` and `int` (deploy.QuantizedModel):
- `file_bytes`: model.safetensors (FP32: the same parameters as float32 safetensors);
- `device_param_bytes`: `on_device_size_in_bytes` of every parameter array held on the device;
- `forward_memory`: XLA's compiled memory analysis of one UNet forward (arguments, outputs, temporaries);
- `forward_s` / `generate_s`: seconds per image at batch 1, warm, median of `--repeats` calls: one UNet forward, and
  the whole N-step DDIM generation (FP32 also at 100 steps); on accelerators also bf16.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax.cpu_flags import apply_cpu_xla_flags  # noqa: E402
apply_cpu_xla_flags()  # before JAX starts: LLVM -O1 on CPU-only machines (tmpq_jax/cpu_flags.py)
from tmpq_jax import deploy, diffusion, models, quant  # noqa: E402
from tmpq_jax.benchmark import environment, timed  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    flags.DEFINE_list("exports", [], "name=DIR of quantized checkpoints (experiments/export.py).")
    flags.DEFINE_list("random", [], "Model shapes with random weights, e.g. ddpm-cifar10-32,sd-1.x.")
    flags.DEFINE_integer("repeats", 20, "Timed calls per latency (median).")
    flags.DEFINE_integer("random_steps", 10, "DDIM steps of the random-weight candidates (quad spacing).")
    flags.DEFINE_list("no_generate", [], "Models whose whole-generation latency is skipped (e.g. sd-1.x on a CPU).")
    flags.DEFINE_list("modes", ["fp32", "dequant", "int"], "Rows per checkpoint.")
    flags.DEFINE_string("out", "benchmarks/deploy.json", "Output JSON (rows are written as they finish).")


def memory(compiled) -> dict | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                            "generated_code_size_in_bytes")}


def device_bytes(tree) -> int:
    return int(sum(x.on_device_size_in_bytes() for x in jax.tree.leaves(tree)))


def inputs(spec, batch=1):
    x, t, y = models.example_inputs(spec, batch)
    return jax.random.normal(jax.random.key(0), x.shape, x.dtype), jnp.full(t.shape, 500, t.dtype), y


def latency(fn, args, repeats) -> dict:
    med, first = timed(fn, *args, repeats=repeats)
    return {"seconds": med, "first_call_s": first, "runs": repeats}


def float_rows(spec, params, timesteps, repeats, generate: bool, dtype=jnp.float32, label="fp32") -> dict:
    model = models.build_model(spec, dtype)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    x, t, y = inputs(spec)
    fwd = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x.astype(dtype), t, y))
    row = {"mode": label, "device_param_bytes": device_bytes(params),
           "forward_memory": memory(fwd.lower(params, x, t, y).compile()),
           "forward_s": latency(fwd, (params, x, t, y), repeats)}
    if generate:
        abar = jnp.asarray(spec.schedule.alphas_cumprod(), jnp.float32)
        kw = spec.schedule.sampler_kwargs()

        def gen_fn(ts):
            def run(p, z, y):
                out = diffusion.ddim_sample(lambda xx, tt, yy: model.apply({"params": p}, xx.astype(dtype), tt,
                                                                           yy).astype(jnp.float32),
                                            abar, jnp.asarray(ts), z, y, **kw)
                return model.apply({"params": p}, out, method="decode") if spec.decoder else out
            return jax.jit(run)

        row["generate_s"] = latency(gen_fn(timesteps), (params, x, y), repeats)
        row["generate_steps"] = len(timesteps)
        if label == "fp32":
            ts100 = spec.schedule.default_timesteps(100)
            row["generate_100_steps_s"] = latency(gen_fn(ts100), (params, x, y), max(3, repeats // 4))
    return row


def quantized_row(path: Path, mode: str, repeats: int, generate: bool) -> dict:
    model = deploy.QuantizedModel.load(path, mode)
    x, t, y = inputs(model.spec)
    fwd = model.forward_fn()
    row = {"mode": mode, "device_param_bytes": device_bytes(model.arrays),
           "forward_memory": memory(fwd.lower(*model.arrays, x, t, y).compile()),
           "forward_s": latency(fwd, (*model.arrays, x, t, y), repeats),
           "fallback_sites": len(model.fallbacks), "fallback_reasons": sorted(set(model.fallbacks.values()))}
    if generate:
        gen = model.sampler_fn()
        row["generate_s"] = latency(gen, (*model.arrays, x, y), repeats)
        row["generate_steps"] = len(model.timesteps)
    return row


def random_export(name: str, out: Path, steps: int):
    """A uniform W8A8 checkpoint of a model's shapes with random weights: abs-max clips, activations in [-4, 4]."""
    from tmpq_jax.benchmark import random_params

    spec = models.get_spec(name)
    model = models.build_model(spec)

    def apply_fn(p, *a):
        return model.apply({"params": p}, *a)

    shapes = models.param_shapes(spec)
    params = random_params(shapes, jax.random.key(0), jnp.float32)
    sites = quant.discover_sites(apply_fn, shapes, models.example_inputs(spec), rules=())
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(params)
    n = len(sites)
    rng = jnp.broadcast_to(jnp.asarray([-4.0, 4.0]), (n, 1, 2))
    clips = {s.path: jnp.max(jnp.abs(flat[quant.sites.kernel_key(s.path)]).reshape(-1, s.out_channels), axis=0)
             for s in sites.sites if s.has_weights}
    cand = quant.CandidateQuant(jnp.full(n, 8, jnp.int32), jnp.full(n, 8, jnp.int32), rng, rng, rng,
                                jnp.zeros(1, jnp.int32), clips, {})
    space_ts = diffusion.quad_timesteps(steps, spec.schedule.num_train_timesteps)
    deploy.export_quantized(out, spec, params, sites, cand, space_ts, name=f"{name}-random-w8a8",
                            source_sha256="random")
    return spec, params


def fp32_file_bytes(params) -> int:
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fp32.safetensors"
        save_file({"/".join(k): np.asarray(v, np.float32) for k, v in flatten_dict(params).items()}, str(p))
        return p.stat().st_size


def main(argv):
    del argv
    out = Path(FLAGS.out)
    bad = [m for m in FLAGS.modes if m not in ("fp32", "dequant", "int")]
    if bad:
        raise app.UsageError(f"--modes has {bad}; valid: fp32, dequant, int")
    jobs = []
    for item in FLAGS.exports:
        if "=" not in item:
            raise app.UsageError(f"--exports entry {item!r} is not name=DIR")
        name, d = item.split("=", 1)
        deploy.read_quantized(d)  # a bad folder fails before any timing
        jobs.append((name, Path(d), None))
    for name in FLAGS.random:
        models.get_spec(name)
        jobs.append((f"{name}-random-w8a8", None, name))
    result = {"environment": environment(), "command": " ".join(sys.argv), "repeats": FLAGS.repeats,
              "batch": 1, "cases": {}}
    accel = jax.devices()[0].platform != "cpu"
    tmp = tempfile.TemporaryDirectory()
    for name, path, random_model in jobs:
        t0 = time.time()
        if random_model is not None:
            print(f"[{name}] exporting random weights", flush=True)
            path = Path(tmp.name) / name
            spec, params = random_export(random_model, path, FLAGS.random_steps)
        ck = deploy.read_quantized(path)
        spec = ck.spec
        if random_model is None:
            from tmpq_jax import checkpoint  # the FP32 params: the checkpoint the search used

            cfg = json.loads((Path(ck.config["search"]["workdir"]) / "results.json").read_text())["config"]
            params = checkpoint.load_params(cfg["checkpoint"], spec) if not cfg.get("model_dir") else \
                models.from_pretrained(cfg["model_dir"], family=cfg["model"])[1]
        generate = (random_model or spec.name) not in FLAGS.no_generate
        case = {"model": spec.name, "timesteps": ck.timesteps.tolist(), "bitops": ck.config["bitops"],
                "fp32_bitops": ck.config["fp32_bitops"],
                "file_bytes": {"quantized": (path / deploy.WEIGHTS_FILE).stat().st_size,
                               "fp32": fp32_file_bytes(params)}, "rows": []}
        result["cases"][name] = case
        for mode in FLAGS.modes:
            print(f"[{name}] {mode}", flush=True)
            row = float_rows(spec, params, ck.timesteps, FLAGS.repeats, generate) if mode == "fp32" else \
                quantized_row(path, mode, FLAGS.repeats, generate)
            case["rows"].append(row)
            print(f"[{name}] {mode}: forward {row['forward_s']['seconds'] * 1e3:.2f} ms"
                  + (f", generate {row['generate_s']['seconds'] * 1e3:.1f} ms" if "generate_s" in row else ""),
                  flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
        if accel:
            case["rows"].append(float_rows(spec, params, ck.timesteps, FLAGS.repeats, generate, jnp.bfloat16,
                                           "bf16"))
        case["seconds"] = time.time() - t0
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
