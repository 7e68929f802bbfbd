"""The end-to-end TMPQ-DM job behind `experiments/search.py`.

load model -> calibrate shared tables -> FP reference -> evolutionary search (checkpointed every generation)
-> re-score the top-k on more samples -> baselines (uniform W8A8 / W6A6, timestep-only, precision-only)
-> results.json, history.jsonl, sample grids, samples_*.npz and plots in the workdir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from tmpq_jax import checkpoint, data, diffusion, models, quant
from tmpq_jax.search.algorithm import EvolutionSearch, EvosaxSearch, make_repair
from tmpq_jax.search.fitness import Evaluator, check_metric_name, make_metric, nan_to_inf
from tmpq_jax.search.space import Genome, SearchSpace
from tmpq_jax.visual import save_grid, save_plots

BASELINES = ("uniform_w8a8", "uniform_w6a6", "timestep_only", "precision_only")


# --- config -------------------------------------------------------------------------------------------------------


def validate_config(c: ml_collections.ConfigDict) -> None:
    def need(name, ok, valid):
        if not ok:
            raise ValueError(f"config.{name}={c[name]!r} is invalid; valid: {valid}")

    models.get_spec(c.model)
    need("num_steps", isinstance(c.num_steps, int) and 1 <= c.num_steps <= diffusion.NUM_TRAIN_TIMESTEPS,
         "an integer in [1, 1000]")
    quant.check_bit_choices(list(c.bit_choices), "config.bit_choices")
    need("budget_bits", c.budget_bits in list(c.bit_choices), f"one of bit_choices {list(c.bit_choices)}")
    need("budget_bitops", c.budget_bitops >= 0, ">= 0 (0: uniform W{budget_bits}A{budget_bits})")
    need("budget_mode", c.budget_mode in ("repair", "infeasible"), "'repair' or 'infeasible'")
    need("generations", c.generations >= 1, ">= 1")
    need("search_samples", c.search_samples >= 2, ">= 2 (a covariance needs two samples)")
    need("final_samples", c.final_samples >= 2, ">= 2")
    need("rescore_top_k", c.rescore_top_k >= 1, ">= 1")
    need("reference_steps", 1 <= c.reference_steps <= diffusion.NUM_TRAIN_TIMESTEPS, "in [1, 1000]")
    need("calib_steps", 1 <= c.calib_steps <= diffusion.NUM_TRAIN_TIMESTEPS, "in [1, 1000]")
    need("calib_samples", c.calib_samples >= 1, ">= 1")
    need("sample_batch", c.sample_batch >= 1, ">= 1")
    need("warm_start", isinstance(c.warm_start, bool), "True or False")
    need("strategy", c.strategy in quant.STRATEGIES, str(quant.STRATEGIES))
    need("algorithm", c.algorithm == "evolution" or c.algorithm[:1].isupper(),
         "'evolution' or an evosax algorithm name such as 'CMA_ES' or 'SimpleGA'")
    check_metric_name(c.metric)
    for name in c.get("report_metrics", []):
        check_metric_name(name, "report_metrics")
    need("fid_batch", c.get("fid_batch", 1) >= 1, ">= 1")
    for name in c.baselines:
        if name not in BASELINES:
            raise ValueError(f"config.baselines has unknown entry {name!r}; valid: {BASELINES}")


# --- helpers ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    config: ml_collections.ConfigDict
    workdir: Path
    sites: quant.SiteTable
    space: SearchSpace
    evaluator: Evaluator
    repair: Any
    budget: float
    timing: dict
    scores: dict = dataclasses.field(default_factory=dict)  # (candidate, n) -> metric, see `evaluate`
    images: dict = dataclasses.field(default_factory=dict)  # (candidate, n) -> images, final scoring only


def _stack_genomes(gs: list[Genome]) -> Genome:
    return jax.tree.map(lambda *x: jnp.stack(x), *gs)


def _make_algorithm(c, space: SearchSpace):
    if c.algorithm == "evolution":
        return EvolutionSearch(space, c.population_size, c.num_parents, c.num_mutation, c.num_crossover,
                               c.mutation_prob)
    return EvosaxSearch(space, c.algorithm, c.population_size)


def _calibrate(c, workdir: Path, apply_fn, params, sites, spec) -> quant.QuantTables:
    path = workdir / "quant_tables.msgpack"
    meta = {"checkpoint_sha256": _sha(c.checkpoint), "calib_steps": c.calib_steps,
            "calib_samples": c.calib_samples, "calib_seed": c.seed, "bit_choices": list(c.bit_choices)}
    if path.exists():
        old = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").exists() else {}
        if all(old.get(k) == v for k, v in meta.items()):
            print(f"loading calibration tables from {path}", flush=True)
            return quant.load_tables(path, sites, list(c.bit_choices))
    abar = jnp.asarray(diffusion.alphas_cumprod(), jnp.float32)
    noise = jax.random.normal(jax.random.key(c.seed + 7919), (c.calib_samples, *spec.sample_shape))
    labels = (jnp.arange(c.calib_samples) % max(spec.num_classes, 1)).astype(jnp.int32)
    ts = diffusion.uniform_timesteps(c.calib_steps)
    mem = c.calib_steps * c.calib_samples * math.prod(spec.sample_shape) * 4 / 2**20
    print(f"calibration: FP DDIM trajectories, {c.calib_steps} timesteps x {c.calib_samples} samples "
          f"({mem:.1f} MiB of UNet inputs)", flush=True)
    _, traj = jax.jit(lambda p: diffusion.ddim_sample(lambda x, t, y: apply_fn(p, x, t, y), abar, ts, noise, labels,
                                                      return_trajectory=True))(params)
    m = c.calib_steps * c.calib_samples
    inputs = (traj.x.reshape(m, *spec.sample_shape), jnp.repeat(traj.t, c.calib_samples),
              jnp.tile(labels, c.calib_steps))
    perm = np.random.default_rng(c.seed).permutation(m)  # mix timesteps across batches
    inputs = tuple(a[perm] for a in inputs)
    tables = quant.calibrate(apply_fn, params, sites, quant.trajectory_batches(inputs, c.calib_batch),
                             list(c.bit_choices), seed=c.seed, num_batches=-(-m // c.calib_batch))
    quant.save_tables(path, tables, sites, meta)
    return tables


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- one evolutionary search, resumable ---------------------------------------------------------------------------


def evolve(ctx: Context, name: str, space: SearchSpace, resume: bool, warm: list[Genome] = ()) -> dict:
    """Run the configured algorithm on `space`; checkpoint after every generation to search_<name>.msgpack.

    `warm` genomes replace the last random members of the first population (warm start).
    """
    c = ctx.config
    algo = _make_algorithm(c, space)
    key = jax.random.key(c.seed)
    ask = jax.jit(algo.ask)
    tell = jax.jit(algo.tell)
    repair = jax.jit(jax.vmap(ctx.repair))
    bitops_of = jax.jit(jax.vmap(ctx.repair.bitops))
    decode = jax.jit(jax.vmap(space.decode))
    state = algo.init(key)
    g, p = c.generations, c.population_size
    log = {"genomes": jax.tree.map(lambda x: np.zeros((g, p, *x.shape), np.int32), space.seed()),
           "fitness": np.full((g, p), np.nan), "bitops": np.zeros((g, p)), "feasible": np.zeros((g, p), bool),
           "seconds": np.zeros(g)}
    path = ctx.workdir / f"search_{name}.msgpack"
    start = 0
    if resume and path.exists():
        saved = checkpoint.load_tree(path, {"state": state, "log": log, "generation": 0})
        state, start = jax.tree.map(jnp.asarray, saved["state"]), int(saved["generation"])
        log = jax.tree.map(np.array, saved["log"])  # writable copies
        for gen in range(start):  # finished generations feed the memo exactly as in an uninterrupted run
            ts, wb, ab = decode(jax.tree.map(lambda x: x[gen], log["genomes"]))
            for i, f in enumerate(log["fitness"][gen]):
                if np.isfinite(f):
                    ctx.scores.setdefault(_candidate_key(ts[i], wb[i], ab[i], c.search_samples), f)
        print(f"[{name}] resumed after generation {start}/{g} from {path}", flush=True)
    history = []
    bar = tqdm(range(start, g), desc=f"search {name}", unit="gen", initial=start, total=g)
    for gen in bar:
        t0 = time.time()
        k = jax.random.fold_in(key, gen)
        pop, state = ask(k, state)
        if gen == 0 and warm:
            pop = jax.tree.map(lambda x, w: x.at[-len(warm):].set(w), pop, _stack_genomes(list(warm)))
        if c.budget_mode == "repair":
            pop, bitops, feasible = repair(pop)
        else:
            bitops = bitops_of(pop)
            feasible = bitops <= ctx.budget
        fit = nan_to_inf(evaluate(ctx, *decode(pop), c.search_samples, feasible=np.asarray(feasible)))
        state = tell(k, pop, jnp.asarray(fit, jnp.float32), state)
        for dst, src in zip(jax.tree.leaves(log["genomes"]), jax.tree.leaves(pop)):
            dst[gen] = np.asarray(src)
        log["fitness"][gen], log["bitops"][gen] = fit, np.asarray(bitops)
        log["feasible"][gen], log["seconds"][gen] = np.asarray(feasible), time.time() - t0
        checkpoint.save_tree(path, {"state": state, "log": log, "generation": gen + 1})
        seen = log["fitness"][: gen + 1].ravel()
        finite = fit[np.isfinite(fit)]
        with open(ctx.workdir / "history.jsonl", "a") as f:  # live progress; rewritten in full at the end
            f.write(json.dumps({"search": name, "generation": gen, "best": float(np.min(seen)),
                                "median": float(np.median(finite)) if finite.size else None,
                                "feasible_fraction": float(np.mean(np.asarray(feasible)))}) + "\n")
        bar.set_postfix(best=f"{np.min(seen):.3f}", median=f"{np.median(finite) if finite.size else np.inf:.3f}",
                        feasible=f"{np.mean(np.asarray(feasible)):.2f}")
    bar.close()
    for gen in range(g):
        fit = log["fitness"][gen]
        finite = fit[np.isfinite(fit)]
        history.append({"search": name, "generation": gen, "best": float(np.min(log["fitness"][: gen + 1])),
                        "median": float(np.median(finite)) if finite.size else None,
                        "feasible_fraction": float(np.mean(log["feasible"][gen])),
                        "seconds": float(log["seconds"][gen])})
    return {"log": log, "history": history, "space": space}


def top_unique(result: dict, k: int) -> list[tuple[Genome, float]]:
    """The k best distinct feasible genomes of a search log, with their search fitness, best first."""
    log = result["log"]
    fit = np.asarray(log["fitness"]).ravel()
    flat = jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), log["genomes"])
    out, seen = [], set()
    for i in np.argsort(fit, kind="stable"):
        if not np.isfinite(fit[i]):
            break
        g = jax.tree.map(lambda x: x[i], flat)
        sig = b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(g))
        if sig not in seen:
            seen.add(sig)
            out.append((g, float(fit[i])))
        if len(out) == k:
            break
    return out


def describe(ctx: Context, g: Genome, space: SearchSpace, fitness: float, metric: float) -> dict:
    ts, wb, ab = (np.asarray(x) for x in space.decode(g))
    wb, ab = (np.asarray(x) for x in quant.engine.resolve_bits(ctx.sites, jnp.asarray(wb), jnp.asarray(ab)))
    bitops = quant.bitops_exact(ctx.sites, wb, ab, len(ts))
    ref = quant.fp_bitops(ctx.sites, ctx.config.reference_steps)
    return {"timesteps": ts.tolist(), "w_bits": dict(zip(ctx.sites.paths, wb.tolist())),
            "a_bits": dict(zip(ctx.sites.paths, ab.tolist())), "bitops": bitops,
            "bitops_reduction": ref / bitops, "within_budget": bool(bitops <= ctx.budget * (1 + 1e-6)),
            "fitness": _num(fitness), "metric": _num(metric),
            "mean_w_bits": float(np.average(wb, weights=ctx.sites.macs)),
            "mean_a_bits": float(np.average(ab, weights=ctx.sites.macs))}


def _num(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _candidate_key(ts, wb, ab, n: int) -> tuple:
    return tuple(np.asarray(a, np.int32).tobytes() for a in (ts, wb, ab)) + (n,)


def evaluate(ctx: Context, ts, wb, ab, n: int, feasible=None, keep_images: bool = False):
    """Metric on `n` samples of each decoded candidate (timesteps[P, N], w_bits[P, L], a_bits[P, L]).

    Infeasible candidates score +inf without sampling. A candidate evaluated before (same timesteps, bits and n) is
    not sampled again: with the fixed noise its score is the same, so the memo changes no result, only the time.
    With `keep_images`, also returns each candidate's images.
    """
    ts, wb, ab = (np.asarray(a) for a in (ts, wb, ab))
    keys = [_candidate_key(ts[i], wb[i], ab[i], n) for i in range(len(ts))]
    ok = np.ones(len(keys), bool) if feasible is None else np.asarray(feasible, bool)
    missing = ctx.images if keep_images else ctx.scores
    todo, seen = [], set()
    for i, k in enumerate(keys):
        if ok[i] and k not in missing and k not in seen:
            seen.add(k)
            todo.append(i)
    if todo:
        strategy = ctx.evaluator.strategy
        if (quant.auto_strategy() if strategy == "auto" else strategy) != "loop":
            todo += todo[-1:] * (len(keys) - len(todo))  # batched strategies compile per population size: keep it
        images = ctx.evaluator.sample(ts[todo], wb[todo], ab[todo], n)
        for i, image_set, value in zip(todo, images, ctx.evaluator.score(images)):
            ctx.scores.setdefault(keys[i], value)
            if keep_images:
                ctx.images.setdefault(keys[i], image_set)
    scores = np.array([ctx.scores[k] if ok[i] else np.inf for i, k in enumerate(keys)], np.float64)
    return (scores, np.stack([ctx.images[k] for k in keys])) if keep_images else scores


def score_genomes(ctx: Context, genomes: list[Genome], space: SearchSpace, n: int):
    """(images[P, n, ...], metric[P]) of genomes decoded in `space`."""
    ts, wb, ab = jax.vmap(space.decode)(_stack_genomes(genomes))
    scores, images = evaluate(ctx, ts, wb, ab, n, keep_images=True)
    return images, scores


# --- the job ------------------------------------------------------------------------------------------------------


def run_search(config: ml_collections.ConfigDict, workdir: str, resume: bool = False) -> dict:
    c = config
    validate_config(c)
    if c.multihost:
        jax.distributed.initialize()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    t_all = t0 = time.time()

    # model and sites
    spec = models.get_spec(c.model)
    model = models.build_model(spec)
    params = checkpoint.load_params(c.checkpoint, spec)

    def apply_fn(p, *a):
        return model.apply({"params": p}, *a)

    rules = [quant.QuantRule(**dict(r)) for r in c.rules] + (list(quant.DEFAULT_RULES) if c.probs_8bit else [])
    sites = quant.discover_sites(apply_fn, models.param_shapes(spec), models.example_inputs(spec), rules)
    space = SearchSpace.create(c.num_steps, len(sites), list(c.bit_choices), c.spacing, list(c.group_starts) or None,
                               seed_bits=c.seed_bits)
    repair = make_repair(space, sites, 0.0)
    min_cost = float(repair.bitops(Genome(space.seed().timestep_idx,
                                          jnp.full(len(sites), len(space.bit_choices) - 1),
                                          jnp.full(len(sites), len(space.bit_choices) - 1))))
    budget = float(c.budget_bitops) if c.budget_bitops else float(repair.bitops(space.uniform_bits(c.budget_bits)))
    if budget < min_cost:
        raise ValueError(f"budget {budget:.4g} BitOPs is impossible: the cheapest candidate (all "
                         f"{space.bit_choices[-1]}-bit, {c.num_steps} steps) costs {min_cost:.4g}")
    repair = make_repair(space, sites, budget)
    print(f"model {spec.name}: {models.count_params(params):,} params, {len(sites)} sites, "
          f"{int(sites.macs.sum()):,} MACs/step; budget {budget:.4g} BitOPs", flush=True)
    timing["load_seconds"] = time.time() - t0

    # metrics first, so that missing weights or reference data fail before any long work
    t0 = time.time()
    metric = make_metric(c.metric, c)
    reports = [make_metric(name, c) for name in c.get("report_metrics", []) if name != c.metric]  # final sets only
    timing["metric_setup_seconds"] = time.time() - t0

    # shared calibration
    t0 = time.time()
    tables = _calibrate(c, workdir, apply_fn, params, sites, spec)
    timing["calibration_seconds"] = time.time() - t0
    evaluator = Evaluator(apply_fn, sites, params, tables, spec.sample_shape, spec.num_classes, metric,
                          c.noise_seed, c.strategy, c.chunk_size, c.sample_batch)
    ctx = Context(c, workdir, sites, space, evaluator, repair, budget, timing)

    # FP reference
    t0 = time.time()
    ref_ts = diffusion.uniform_timesteps(c.reference_steps)
    print(f"FP reference: {c.reference_steps} DDIM steps, {c.final_samples} samples", flush=True)
    ref_images = evaluator.sample_fp(ref_ts, c.final_samples)
    reference = {"steps": c.reference_steps, "timesteps": ref_ts.tolist(),
                 "bitops": quant.fp_bitops(sites, c.reference_steps),
                 "fitness": _num(metric(ref_images[: c.search_samples])), "metric": _num(metric(ref_images))}
    timing["reference_seconds"] = time.time() - t0

    # single-axis searches first when they warm-start the joint search
    t0 = time.time()
    singles = {}
    for name in [b for b in c.baselines if b in ("timestep_only", "precision_only")]:
        print(f"baseline search {name}", flush=True)
        sub = space.restrict(search_timesteps=name == "timestep_only", search_bits=name == "precision_only")
        singles[name] = (evolve(ctx, name, sub, resume), sub)
    timing["single_axis_search_seconds"] = time.time() - t0
    warm = [top[0][0] for top in (top_unique(r, 1) for r, _ in singles.values()) if top] \
        if c.warm_start and c.algorithm == "evolution" else []

    # main search
    t0 = time.time()
    main = evolve(ctx, "joint", space, resume, warm)
    timing["search_seconds"] = time.time() - t0
    timing["candidates_per_second"] = c.population_size * c.generations / max(float(main["log"]["seconds"].sum()),
                                                                               1e-9)

    # re-score the top-k on more samples
    t0 = time.time()
    best, best_images = rescore(ctx, main, space, "joint")
    timing["rescore_seconds"] = time.time() - t0

    # baselines at the same N and budget
    t0 = time.time()
    baselines, baseline_images, histories = {}, {}, list(main["history"])
    for name in c.baselines:
        print(f"baseline {name}", flush=True)
        if name.startswith("uniform_"):
            bits = int(name.split("_w")[1].split("a")[0])
            g = space.uniform_bits(bits)
            fit = evaluate(ctx, *jax.vmap(space.decode)(_stack_genomes([g])), c.search_samples)[0]
            images, final = score_genomes(ctx, [g], space, c.final_samples)
            baselines[name] = describe(ctx, g, space, fit, final[0])
            baseline_images[name] = images[0]
        else:
            result, sub = singles[name]
            histories += result["history"]
            baselines[name], baseline_images[name] = rescore(ctx, result, sub, name)
            main.setdefault("others", {})[name] = result
    timing["baselines_seconds"] = time.time() - t0

    # extra metrics (e.g. Inception FID) on the final image sets, next to the search metric
    t0 = time.time()
    final_sets = {"reference": (reference, ref_images), "best": (best, best_images),
                  **{k: (baselines[k], baseline_images[k]) for k in baselines}}
    digests = {name: hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
               for name, (_, images) in final_sets.items()}  # e.g. best == precision_only after a warm start
    for m in reports:
        print(f"report {m.name}: {len(set(digests.values()))} distinct image sets x {c.final_samples} samples",
              flush=True)
        done = {}
        for name, (entry, images) in tqdm(final_sets.items(), desc=m.name, unit="set"):
            if digests[name] not in done:
                done[digests[name]] = _num(m(images))
            entry.setdefault("report_metrics", {})[m.name] = done[digests[name]]
    timing["report_seconds"] = time.time() - t0
    timing["total_seconds"] = time.time() - t_all

    # outputs
    results = {
        "config": c.to_dict(),
        "model": {"name": spec.name, "unet_config": {k: list(v) if isinstance(v, tuple) else v
                                                       for k, v in spec.unet.items()},
                  "sample_shape": list(spec.sample_shape), "params": models.count_params(params),
                  "macs_per_step": int(sites.macs.sum()), "quantized_sites": len(sites),
                  "sites": dict(zip(sites.paths, sites.macs.tolist()))},
        "reference": reference, "budget_bitops": budget, "best": best, "baselines": baselines,
        "history": [h for h in histories if h["search"] == "joint"],
        "baseline_history": [h for h in histories if h["search"] != "joint"],
        "timing": timing, "metric_name": metric.name, "report_metric_names": [m.name for m in reports],
        "metric_samples": {"search": c.search_samples, "final": c.final_samples},
        "devices": [d.device_kind for d in jax.devices()], "strategy": quant.auto_strategy()
        if c.strategy == "auto" else c.strategy,
    }
    write_outputs(workdir, results, histories, ref_images, best_images, baseline_images, main, space, sites)
    return results


def rescore(ctx: Context, result: dict, space: SearchSpace, name: str):
    """Re-score the top-k of a search on `final_samples`; the best by that metric wins (TMPQ-DM Sec. 4)."""
    c = ctx.config
    top = top_unique(result, c.rescore_top_k)
    if not top:
        raise RuntimeError(f"search {name!r} found no feasible candidate in {c.generations} generations; raise the "
                           "budget or use budget_mode='repair'")
    genomes = [g for g, _ in top]
    images, final = score_genomes(ctx, genomes, space, c.final_samples)
    final = nan_to_inf(final)
    i = int(np.argmin(final))
    out = describe(ctx, genomes[i], space, top[i][1], final[i])
    ranked = sorted(zip(final.tolist(), range(len(top))))
    out["rescored"] = [{"rank_by_search": j, "metric": _num(m)} for m, j in ranked]
    return out, images[i]


def write_outputs(workdir: Path, results, histories, ref_images, best_images, baseline_images, main, space, sites):
    checkpoint.write_json(workdir / "results.json", results)
    with open(workdir / "history.jsonl", "w") as f:
        for h in histories:
            f.write(json.dumps(h) + "\n")
    sets = {"reference": ref_images, "best": best_images, **baseline_images}
    for name, images in sets.items():
        unit = data.to_unit_range(images)
        np.savez_compressed(workdir / f"samples_{name}.npz", images=unit)
        save_grid(workdir / f"samples_{name}.png", unit[:100], ncols=10)
    scatter = {"joint": main["log"], **{k: v["log"] for k, v in main.get("others", {}).items()}}
    save_plots(workdir, histories, scatter, results)
    print(summary_table(results), flush=True)


def summary_table(results: dict) -> str:
    """One row per final image set: BitOPs, reduction vs FP32, search metric and any report metrics."""
    names = [results["metric_name"], *results.get("report_metric_names", [])]
    rows = {"reference": results["reference"], "best": results["best"], **results["baselines"]}
    fp = results["reference"]["bitops"]
    out = [f"{'':16s} {'BitOPs':>10s} {'vs FP32':>8s} " + " ".join(f"{n:>14s}" for n in names)]
    for name, e in rows.items():
        vals = [e["metric"], *[e.get("report_metrics", {}).get(n) for n in names[1:]]]
        out.append(f"{name:16s} {e['bitops']:10.4g} {fp / e['bitops']:7.0f}x " +
                   " ".join(f"{v:14.3f}" if v is not None else f"{'-':>14s}" for v in vals))
    return f"final scores on {results['metric_samples']['final']} samples each:\n" + "\n".join(out)
