"""The end-to-end TMPQ-DM job behind `experiments/search.py`, as named stages with typed inputs and outputs:

problem -> metrics -> calibrate -> teachers -> searches -> rescore -> baselines -> report -> outputs

Fitness, top-k selection and reported numbers each use their own noise (`fitness.purpose_noise`), and reports
compare with other reference data than the fitness (DESIGN.md Sec. 5).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from tmpq_jax import checkpoint, data, diffusion, models, quant, sampling, text
from tmpq_jax.cpu_flags import backend_opt_level
from tmpq_jax.search import knapsack, local, operators, pareto, sensitivity, timestep_dp
from tmpq_jax.search.algorithm import EvolutionSearch, EvosaxSearch
from tmpq_jax.search.budget import Budget
from tmpq_jax.search.cache import cache_key, cache_tag, key_diff
from tmpq_jax.search.driver import (SearchResult, SearchSettings, check_fingerprint, decode_np, evolve, genome_key,
                                    stack_genomes)
from tmpq_jax.search.fitness import (METRICS, Evaluator, Metric, NoiseSet, candidate_key, check_metric_for_model,
                                     make_metric, nan_to_inf, purpose_noise)
from tmpq_jax.search.space import Genome, SearchSpace
from tmpq_jax.visual import save_grid, save_plots

MATMUL_PRECISIONS = ("highest", "high", "default")  # jax_default_matmul_precision (TPU: 'default' = bf16 passes)
BASELINES = ("uniform_w8a8", "uniform_w6a6", "timestep_only", "precision_only", "greedy_bits", "knapsack")
SINGLE_AXIS = {"timestep_only": dict(search_timesteps=True, search_bits=False),
               "precision_only": dict(search_timesteps=False, search_bits=True)}
# settings that change no search result: left out of the resume fingerprint
NOT_IN_FINGERPRINT = ("report_metrics", "report_reference", "report_noise_seed", "final_samples", "fid_cache",
                      "fid_batch", "sample_batch", "chunk_size", "multihost", "select_samples", "rescore_top_k",
                      "rescore_incumbents", "rescore_starts", "select_metric")


# --- config -------------------------------------------------------------------------------------------------------


def make_algorithm(c, space: SearchSpace, site_paths=()):
    if c.algorithm == "evolution":
        return EvolutionSearch(space, c.population_size, c.num_parents, c.num_mutation, c.num_crossover,
                               c.mutation_prob)
    if c.algorithm == "local":
        blocks = tuple(int(b) for b in operators.block_ids(site_paths)) if len(site_paths) else ()
        return local.LocalSearch(space, c.population_size, c.num_parents, c.num_mutation, c.num_crossover,
                                 c.mutation_prob, expected_genes=c.expected_genes, blocks=blocks)
    algo = EvosaxSearch(space, c.algorithm, c.population_size)
    algo._strategy()  # unknown names fail here
    return algo


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Every setting checked before any expensive step; errors name the value and the valid range."""
    def need(name, ok, valid):
        if not ok:
            raise ValueError(f"config.{name}={c[name]!r} is invalid; valid: {valid}")

    spec = resolve_spec(c)
    T = spec.schedule.num_train_timesteps
    need("num_steps", isinstance(c.num_steps, int) and 1 <= c.num_steps <= T, f"an integer in [1, {T}]")
    quant.check_bit_choices(list(c.bit_choices), "config.bit_choices")
    need("budget_bits", c.budget_bits in list(c.bit_choices), f"one of bit_choices {list(c.bit_choices)}")
    need("budget_bitops", c.budget_bitops >= 0 and float(c.budget_bitops) == int(c.budget_bitops),
         "a whole number >= 0 (0: uniform W{budget_bits}A{budget_bits})")
    need("generations", isinstance(c.generations, int) and c.generations >= 1, "an integer >= 1")
    need("search_samples", c.search_samples >= 2, ">= 2 (a covariance needs two samples)")
    need("select_samples", c.select_samples >= c.search_samples, f">= search_samples={c.search_samples}")
    need("final_samples", c.final_samples >= c.search_samples, f">= search_samples={c.search_samples}")
    levels = tuple(c.fidelity_samples) or (c.search_samples,)
    need("fidelity_samples", all(b > a for a, b in zip(levels, levels[1:])) and levels[-1] == c.search_samples
         and levels[0] >= 2, f"ascending sample counts >= 2 ending at search_samples={c.search_samples}, or ()")
    need("fidelity_keep", 0.0 < c.fidelity_keep <= 1.0, "in (0, 1]")
    need("max_redraw", c.max_redraw >= 0, ">= 0")
    need("rescore_top_k", c.rescore_top_k >= 1, ">= 1")
    need("reference_steps", 1 <= c.reference_steps <= T, f"in [1, {T}]")
    need("calib_steps", 1 <= c.calib_steps <= T, f"in [1, {T}]")
    for name in ("calib_samples", "calib_batch", "sample_batch", "fid_batch", "chunk_size"):
        need(name, isinstance(c[name], int) and c[name] >= 1, "an integer >= 1")
    need("warm_start", isinstance(c.warm_start, bool), "True or False")
    need("strategy", c.strategy in quant.STRATEGIES, str(quant.STRATEGIES))
    for name in c.baselines:
        if name not in BASELINES:
            raise ValueError(f"config.baselines has unknown entry {name!r}; valid: {BASELINES}")
        if name.startswith("uniform_") and uniform_bits(name) not in list(c.bit_choices):
            raise ValueError(f"config.baselines has {name!r}, whose {uniform_bits(name)} bits are not among "
                             f"config.bit_choices={list(c.bit_choices)}; valid: uniform baselines at those bits "
                             f"(or add {uniform_bits(name)} to bit_choices)")
    if not c.budget_bitops and c.seed_bits != c.budget_bits:
        raise ValueError(f"config.seed_bits={c.seed_bits} differs from config.budget_bits={c.budget_bits}: the "
                         f"DDIM-quad seed (uniform W{c.seed_bits}A{c.seed_bits}) and the budget (uniform "
                         f"W{c.budget_bits}A{c.budget_bits}) must be the same candidate; valid: seed_bits = "
                         f"budget_bits, or an explicit config.budget_bitops")
    source = f"config.model_dir={c.model_dir!r}" if c.get("model_dir", "") else f"config.model={c.model!r}"
    spec.schedule.check_sampleable(source=source)
    # metrics and their reference data, against the model
    check_metric_for_model(c.metric, c.fitness_reference, spec.image_shape, "metric")
    if select_metric_name(c) != c.metric:
        check_metric_for_model(select_metric_name(c), c.fitness_reference, spec.image_shape, "select_metric")
    for name in c.report_metrics:
        check_metric_for_model(name, c.report_reference, spec.image_shape, "report_metrics")
    # text conditioning, guidance, attention and matmul precision
    g = c.get("guidance_scale", 1.0)
    need("guidance_scale", isinstance(g, (int, float)) and math.isfinite(g) and g >= 1.0,
         ">= 1 (1: no classifier-free guidance; > 1: two UNet passes per step)")
    if g != 1.0 and spec.conditioning != "text":
        raise ValueError(f"config.guidance_scale={g} needs a text-conditioned model; {spec.name!r} is "
                         f"{spec.conditioning!r}-conditioned (valid: 1.0)")
    if spec.conditioning == "text":
        if not (c.get("prompts_file", "") or c.get("prompt_embeds", "")):
            raise ValueError("a text-to-image model needs prompts: set --config.prompts_file=FILE (one prompt per "
                             "line, e.g. experiments/prompts/smoke.txt) or --config.prompt_embeds=FILE.npz")
        for name in ("prompts_file", "prompt_embeds"):
            if c.get(name, "") and not Path(c[name]).is_file():
                raise FileNotFoundError(f"config.{name}={c[name]!r} does not exist")
    for name in ("memory_efficient_attention", "split_head_dim"):
        need(name, isinstance(c.get(name, False), bool), "True or False")
    need("matmul_precision", c.get("matmul_precision", "highest") in MATMUL_PRECISIONS, str(MATMUL_PRECISIONS))
    if ((METRICS[c.metric].needs_reference or METRICS[select_metric_name(c)].needs_reference)
            and c.fitness_reference == c.report_reference):
        raise ValueError(f"config.fitness_reference={c.fitness_reference!r} equals config.report_reference: the "
                         "reported metric must not compare with the data the fitness saw (e.g. 'mnist-fitness' "
                         "vs 'mnist-heldout')")
    # the algorithm (population arithmetic, evosax names) and the space
    make_algorithm(c, make_space(c, spec, 1))
    spec.schedule.default_timesteps(c.reference_steps)  # steps_offset may push the teacher's grid past T
    spec.schedule.default_timesteps(c.calib_steps)
    need("calib_trajectories", c.calib_trajectories in CALIB_TRAJECTORIES, str(CALIB_TRAJECTORIES))
    need("calib_ranges", c.calib_ranges in CALIB_RANGES, str(CALIB_RANGES))
    try:
        quant.check_range_norm(c.act_range_norm)
    except ValueError:
        need("act_range_norm", False, "a number >= 1 (2 = MSE, a larger p clips less)")
    need("unclipped_sites", isinstance(c.unclipped_sites, (list, tuple)) and
         all(isinstance(p, str) and _is_regex(p) for p in c.unclipped_sites), "a list of regular expressions")
    need("unclipped_min_bits", isinstance(c.unclipped_min_bits, int) and 2 <= c.unclipped_min_bits <= 16,
         "an integer bit-width in [2, 16] (2: every bit-width)")
    need("calib_schedules", isinstance(c.calib_schedules, int) and c.calib_schedules >= 1,
         "an integer >= 1 (the DDIM-quad seed plus calib_schedules - 1 random schedules)")
    for name in ("split_skip", "reconstruct"):
        need(name, isinstance(c[name], bool), "True or False")
    need("first_last_bits", isinstance(c.first_last_bits, int) and (c.first_last_bits == 0 or
                                                                   2 <= c.first_last_bits <= 16),
         "0 (the first and last layer are searched like the others) or a bit-width in [2, 16]")
    need("recon_samples", isinstance(c.recon_samples, int) and c.recon_samples >= 1, "an integer >= 1")
    recon_settings(c).check()
    # the local search's sensitivities and knapsack start
    lower = sorted(c.bit_choices, reverse=True)[1:]
    need("sensitivity_probe_bits", len(c.sensitivity_probe_bits) >= 1 and all(b in lower for b in
                                                                             c.sensitivity_probe_bits),
         f"one or more of the lower bit choices {lower}")
    need("sensitivity_samples", isinstance(c.sensitivity_samples, int) and c.sensitivity_samples >= 2,
         "an integer >= 2")
    need("sensitivity_mac_share", 0.0 < c.sensitivity_mac_share <= 1.0, "in (0, 1] (1: probe every site)")
    need("sensitivity_metric", c.get("sensitivity_metric", "fitness") in SENSITIVITY_METRICS,
         f"one of {list(SENSITIVITY_METRICS)}")
    for name in ("dp_per_group", "dp_samples"):
        need(name, isinstance(c[name], int) and c[name] >= 1, "an integer >= 1")
    # one front for every budget
    for b in c.budgets:  # the form here; the range against the model's cheapest candidate in build_problem
        pareto.entry_limit(b, 1)
    need("pareto_generations", isinstance(c.pareto_generations, int) and c.pareto_generations >= 0,
         "an integer >= 0 (generations of the search at each extra budget; 0: only the shared pool)")
    need("knapsack_weights", len(c.knapsack_weights) >= 1 and all(0.0 <= w <= 1.0 for w in c.knapsack_weights),
         "one or more weightings in [0, 1] (weights' share of the damage)")


def _is_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False


def make_space(c, spec: models.ModelSpec, num_sites: int) -> SearchSpace:
    """The joint space of a config: groups on the model's schedule (from its `first_timestep`), bit choices, seed."""
    return SearchSpace.create(c.num_steps, num_sites, list(c.bit_choices), c.spacing, list(c.group_starts) or None,
                              seed_bits=c.seed_bits, num_train_timesteps=spec.schedule.num_train_timesteps,
                              first_timestep=spec.schedule.first_timestep())


def uniform_bits(name: str) -> int:
    """The bits of a uniform baseline's name: 'uniform_w6a6' -> 6."""
    return int(name.split("_w")[1].split("a")[0])


def resolve_spec(c) -> models.ModelSpec:
    """The model of a config: a named embedded model, or a local diffusers folder (`model_dir`) whose family is
    `model` (configs only are read here, so a bad folder fails before any long work)."""
    model_dir = c.get("model_dir", "")
    if not model_dir:
        if c.model in models.FAMILIES and c.model not in models.MODEL_SPECS:
            raise ValueError(f"config.model={c.model!r} is a model family: give its folder with "
                             f"--config.model_dir=PATH (e.g. a downloaded google/ddpm-cifar10-32 for 'unet2d')")
        return models.get_spec(c.model)
    if c.model not in models.FAMILIES:
        raise ValueError(f"config.model_dir is set, so config.model must be a model family, one of "
                         f"{sorted(models.FAMILIES)}; got {c.model!r} (an embedded model name)")
    return dataclasses.replace(models.read_spec(model_dir, c.model), **spec_overrides(c))


def spec_overrides(c) -> dict:
    """Config settings that change the model function: guidance and the attention path (text models)."""
    out = {}
    if c.get("guidance_scale", 1.0) != 1.0:
        out["guidance_scale"] = float(c.guidance_scale)
    if c.get("memory_efficient_attention", False) or c.get("split_head_dim", False):
        out["attention"] = {"use_memory_efficient_attention": bool(c.get("memory_efficient_attention", False)),
                            "split_head_dim": bool(c.get("split_head_dim", False))}
    return out


def fingerprint(c: ml_collections.ConfigDict, checkpoint_sha: str) -> dict:
    """Every setting that affects a search's results (resume refuses a change in any of them)."""
    out = {k: v for k, v in json.loads(c.to_json()).items() if k not in NOT_IN_FINGERPRINT}
    out["checkpoint_sha256"] = checkpoint_sha
    out["xla_backend_optimization_level"] = backend_opt_level()
    return out


def model_sha(c) -> str:
    """sha256 of the model's weights: the checkpoint file, or every config and weight file of `model_dir`."""
    if not c.get("model_dir", ""):
        return _sha(c.checkpoint)
    h = hashlib.sha256(models.folder_digest(c.model_dir).encode())
    for name in ("prompts_file", "prompt_embeds"):  # text models: the prompts are part of the model function
        if c.get(name, ""):
            h.update(name.encode() + _sha(c[name]).encode())
    return h.hexdigest()


def _sha(path) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --- stage 1: problem -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """The model, its quantization sites, the joint space and the exact budget."""

    spec: models.ModelSpec
    apply_fn: Any
    params: Any
    sites: quant.SiteTable
    space: SearchSpace
    budget: Budget
    checkpoint_sha: str
    decode_fn: Any = None  # latent models: (params, latents) -> images, full precision, not in BitOPs
    prompts: tuple[str, ...] = ()  # text models: prompt i % P conditions sample i
    budgets: tuple[Budget, ...] = ()  # every budget of the front (config.budgets and `budget`), ascending


def build_problem(c, workdir: Path | None = None) -> Problem:
    """Load the model (a text model's prompts are encoded or read here, cached in `workdir`), find its sites."""
    prompts = ()
    if c.get("model_dir", ""):
        spec = resolve_spec(c)
        overrides = spec_overrides(c)
        pe = None
        if spec.conditioning == "text":
            pe = text.prompt_embeddings(c.get("prompts_file", "") or None, c.get("prompt_embeds", "") or None,
                                        c.model_dir, workdir, spec.cross_attention_dim, c.get("negative_prompt", ""))
            overrides["num_classes"] = pe.num_prompts
            prompts = tuple(pe.prompts)
        print(f"loading {c.model} model from {c.model_dir}", flush=True)
        model, params, spec = models.from_pretrained(c.model_dir, family=c.model, **overrides)
        if pe is not None:  # the prompt tables are data, not quantized
            params = {**params, "prompt_embeds": jnp.asarray(pe.embeds), "negative_embeds": jnp.asarray(pe.negative)}
    else:
        spec = models.get_spec(c.model)
        model = models.build_model(spec)
        params = checkpoint.load_params(c.checkpoint, spec)
    sha = model_sha(c)

    def apply_fn(p, *a):
        return model.apply({"params": p}, *a)

    decode_fn = (lambda p, z: model.apply({"params": p}, z, method="decode")) if spec.decoder else None
    rules = [*quant.first_last_rules(c.first_last_bits), *(quant.QuantRule(**dict(r)) for r in c.rules),
             *(quant.DEFAULT_RULES if c.probs_8bit else ())]  # a later rule's pin wins
    sites = quant.discover_sites(apply_fn, models.param_shapes(spec), models.example_inputs(spec), rules,
                                 split_skip=c.split_skip)
    if spec.unet_passes_per_step > 1:  # classifier-free guidance: every site runs once per pass
        sites = quant.SiteTable(tuple(dataclasses.replace(s, macs=s.macs * spec.unet_passes_per_step)
                                      for s in sites.sites))
    space = make_space(c, spec, len(sites))
    budget = Budget.create(sites, space, int(c.budget_bitops) or None, c.budget_bits)
    budgets = front_budgets(c, sites, space, budget)
    print(f"model {spec.name}: {models.count_params(params):,} params, {len(sites)} sites, "
          f"{int(sites.macs.sum()):,} MACs/step ({spec.unet_passes_per_step} UNet pass(es) per step); budget "
          f"{budget.limit:,} BitOPs" + (f"; front at {[b.limit for b in budgets]}" if len(budgets) > 1 else ""),
          flush=True)
    return Problem(spec, apply_fn, params, sites, space, budget, sha, decode_fn, prompts, budgets)


def front_budgets(c, sites: quant.SiteTable, space: SearchSpace, budget: Budget) -> tuple[Budget, ...]:
    """The budgets of the front: config.budgets (fractions of `budget` or BitOPs) and `budget` itself, ascending;
    each between the all-lowest and the all-highest candidate."""
    lo, hi = min(space.bit_choices), max(space.bit_choices)
    limits = pareto.budget_limits(c.budgets, budget.limit, budget.cost_of(space.uniform_bits(lo)),
                                  budget.cost_of(space.uniform_bits(hi)))
    return tuple(dataclasses.replace(budget, limit=b) for b in limits)


# --- stage 2: metrics ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MetricSet:
    fitness: Metric  # every generation, on the fitness noise
    reports: tuple[Metric, ...]  # reported on the report noise against the report reference
    select: Metric | None = None  # the top-k re-scoring on the select noise; None: the fitness

    @property
    def selection(self) -> Metric:
        return self.select if self.select is not None else self.fitness


def select_metric_name(c) -> str:
    """`config.select_metric`, or the fitness metric when it is ''."""
    name = c.get("select_metric", "") or c.metric
    if name not in METRICS:
        raise ValueError(f"config.select_metric={name!r} is unknown; valid: '' (the fitness) or one of "
                         f"{sorted(METRICS)}")
    return name


def build_metrics(c) -> MetricSet:
    """Built before any long work, so missing weights or reference data fail at once."""
    fitness = make_metric(c.metric, c, c.fitness_reference)
    name = select_metric_name(c)
    select = None if name == c.metric else make_metric(name, c, c.fitness_reference)
    return MetricSet(fitness, tuple(make_metric(n, c, c.report_reference) for n in c.report_metrics), select)


# --- stage 3: calibration ----------------------------------------------------------------------------------------------


CALIB_TRAJECTORIES = ("candidates", "uniform")
CALIB_RANGES = ("per_group", "shared")


def recon_settings(c) -> quant.ReconSettings:
    return quant.ReconSettings(iters=c.recon_iters, batch=c.recon_batch, lr_round=c.recon_lr_round,
                               lr_act=c.recon_lr_act, reg=c.recon_reg, warmup=c.recon_warmup, seed=c.seed)


def calibration_schedules(c, problem: Problem) -> list[np.ndarray]:
    """The FP schedules whose trajectories calibrate: 'candidates': the DDIM-quad seed and calib_schedules - 1
    random schedules of one step per group (what candidates run); 'uniform': `calib_steps` on diffusers' grid."""
    if c.calib_trajectories == "uniform":
        return [np.asarray(problem.spec.schedule.default_timesteps(c.calib_steps), np.int32)]
    space = problem.space
    keys = jax.random.split(jax.random.key(c.seed + 104729), c.calib_schedules - 1)
    return [np.asarray(space.timesteps(space.seed()))] + [np.asarray(space.timesteps(space.random(k))) for k in keys]


def calibration_inputs(c, problem: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UNet inputs (x_t, t, label) of FP DDIM trajectories, `calib_samples` per schedule (its own noise), on the
    host. Trajectories run in chunks of calib_batch samples (a short last chunk padded: one compiled program)."""
    spec = problem.spec
    schedules = calibration_schedules(c, problem)
    abar = jnp.asarray(spec.schedule.alphas_cumprod(), jnp.float32)
    labels = (jnp.arange(c.calib_samples) % max(spec.num_classes, 1)).astype(jnp.int32)
    apply_fn = problem.apply_fn
    traj_fn = jax.jit(lambda p, ts, z, y: diffusion.ddim_sample(lambda x, t, yy: apply_fn(p, x, t, yy), abar, ts, z,
                                                                y, return_trajectory=True,
                                                                **spec.schedule.sampler_kwargs())[1].x)
    chunk = min(c.calib_batch, c.calib_samples)
    noise0 = jax.random.normal(jax.random.key(c.seed + 7919), (c.calib_samples, *spec.sample_shape))
    compiled = traj_fn.lower(problem.params, jnp.asarray(schedules[0]), noise0[:chunk], labels[:chunk]).compile()
    print(calibration_memory(c, spec, problem.params, compiled, sum(len(s) for s in schedules)), flush=True)
    xs, ts, ys = [], [], []
    for k, sched in enumerate(tqdm(schedules, desc="calibration trajectories", unit="schedule", mininterval=2.0)):
        noise = noise0 if k == 0 else jax.random.normal(jax.random.fold_in(jax.random.key(c.seed + 7919), k),
                                                        noise0.shape)
        fn = compiled if len(sched) == len(schedules[0]) else jax.jit(traj_fn)
        for i in range(0, c.calib_samples, chunk):
            z, y = noise[i:i + chunk], labels[i:i + chunk]
            pad = chunk - len(z)
            z, y = jnp.pad(z, ((0, pad),) + ((0, 0),) * (z.ndim - 1)), jnp.pad(y, (0, pad))
            x = np.asarray(fn(problem.params, jnp.asarray(sched), z, y))[:, :chunk - pad]  # (N, b, ...)
            xs.append(x.reshape(-1, *spec.sample_shape))
            ts.append(np.repeat(sched, x.shape[1]))
            ys.append(np.tile(np.asarray(y[:chunk - pad]), len(sched)))
    return np.concatenate(xs), np.concatenate(ts).astype(np.int32), np.concatenate(ys).astype(np.int32)


def calibration_groups(c, problem: Problem) -> np.ndarray:
    """Group starts of the activation ranges: the search space's groups ('per_group') or one group ('shared')."""
    return np.asarray(problem.space.starts if c.calib_ranges == "per_group" else (0,), np.int32)


def tables_key(c, problem: Problem) -> dict:
    """The cache key of the calibration tables: every setting that changes them, the sites and the split sites."""
    sites = problem.sites
    return cache_key("tables", c, problem.checkpoint_sha, sites=list(sites.paths),
                     split_sites=[s.path for s in sites.sites if s.split_at])


def calibrate(c, problem: Problem, workdir: Path) -> quant.QuantTables:
    """Shared per-bit tables on FP DDIM trajectories (TMPQ-DM Sec. 3.3), cached in the workdir: MSE clipping and
    ranges per timestep group, then (config.reconstruct) learned rounding and step sizes per block."""
    spec, sites = problem.spec, problem.sites
    path = workdir / "quant_tables.msgpack"
    key = tables_key(c, problem)
    if path.exists() and path.with_suffix(".json").exists():
        diff = key_diff(json.loads(path.with_suffix(".json").read_text()).get("cache_key"), key)
        if not diff:
            print(f"loading calibration tables from {path}", flush=True)
            return quant.load_tables(path, sites, list(c.bit_choices))
        print(f"calibration tables in {path} were made under other settings ({', '.join(diff[:6])}); "
              "recalibrating", flush=True)
    t0 = time.time()
    # 1. FP trajectories of the schedules candidates run
    inputs = calibration_inputs(c, problem)
    m = len(inputs[1])
    # 2. MSE clipping and ranges, per timestep group (each batch holds one group) or shared (timesteps mixed)
    starts = calibration_groups(c, problem)
    if len(starts) > 1:
        batches, n = quant.group_batches(inputs, c.calib_batch, starts), quant.num_group_batches(inputs[1],
                                                                                               c.calib_batch, starts)
    else:
        perm = np.random.default_rng(c.seed).permutation(m)  # mix timesteps across batches
        batches, n = quant.trajectory_batches(tuple(a[perm] for a in inputs), c.calib_batch), -(-m // c.calib_batch)
    tables = quant.calibrate(problem.apply_fn, problem.params, sites, batches, list(c.bit_choices), seed=c.seed,
                             num_batches=n, group_starts=starts, range_norm=c.act_range_norm,
                             unclipped=list(c.unclipped_sites), unclipped_min_bits=c.unclipped_min_bits)
    kept = int(quant.unclipped_sites(sites, c.unclipped_sites).sum())
    print(f"calibration: ranges of {len(starts)} timestep group(s) from {m} UNet inputs ({kept} unclipped sites) in "
          f"{time.time() - t0:.0f} s", flush=True)
    # 3. learned rounding and step sizes, block by block, on a subset of the inputs (every group)
    if c.reconstruct:
        t1 = time.time()
        sub = reconstruction_subset(c, inputs, starts)
        blocks = quant.find_blocks(problem.apply_fn, models.param_shapes(spec), models.example_inputs(spec), sites)
        tables = quant.reconstruct(problem.apply_fn, problem.params, sites, tables, blocks,
                                   quant.group_batches(sub, c.calib_batch, starts),
                                   lambda b: int(quant.host_group_of(starts, b[1])[0]), recon_settings(c))
        quant.check_finite_tables(sites, tables.table_bits, tables.w_clip, tables.a_range, tables.w_range,
                                  tables.skip_range)
        print(f"calibration: {len(blocks)} blocks reconstructed in {time.time() - t1:.0f} s", flush=True)
    quant.save_tables(path, tables, sites, {"cache_key": key, "seconds": time.time() - t0})
    return tables


def reconstruction_subset(c, inputs: tuple, starts) -> tuple:
    """`recon_samples` of the calibration inputs, the same number from every timestep group (fixed seed)."""
    groups = quant.host_group_of(starts, inputs[1])
    uniq = np.unique(groups)
    per = max(1, c.recon_samples // len(uniq))
    rng = np.random.default_rng(c.seed + 1)
    idx = np.concatenate([rng.choice(np.flatnonzero(groups == g), min(per, int(np.sum(groups == g))), replace=False)
                          for g in uniq])
    return tuple(a[np.sort(idx)] for a in inputs)


def calibration_memory(c, spec: models.ModelSpec, params, compiled, num_steps: int) -> str:
    """What calibration will hold: the trajectories on the host, params and XLA's estimate for one chunk."""
    host = num_steps * c.calib_samples * math.prod(spec.sample_shape) * 4
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    mem = compiled.memory_analysis()
    chunk = (f"{(mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20:,.0f} MiB per chunk of "
             f"{min(c.calib_batch, c.calib_samples)} trajectories (XLA estimate)") if mem is not None else \
        "chunk memory unknown on this backend"
    return (f"calibration: FP DDIM trajectories, {num_steps} timesteps x {c.calib_samples} samples; memory: "
            f"{host / 2**20:,.0f} MiB of trajectories on the host, params {param_bytes / 2**20:,.0f} MiB and "
            f"{chunk} on {jax.devices()[0].device_kind}")


def make_evaluator(c, problem: Problem, tables: quant.QuantTables) -> Evaluator:
    return Evaluator(problem.apply_fn, problem.sites, problem.params, tables, problem.spec.sample_shape,
                     problem.spec.num_classes, c.strategy, c.chunk_size, c.sample_batch, problem.spec.schedule,
                     problem.decode_fn)


# --- stage 4: teachers -------------------------------------------------------------------------------------------------


def noise_sets(c) -> dict[str, NoiseSet]:
    return {"fitness": NoiseSet(c.noise_seed, "fitness", c.search_samples),
            "select": NoiseSet(c.noise_seed, "select", c.select_samples),
            "report": NoiseSet(c.report_noise_seed, "report", c.final_samples)}


def reference_timesteps(c, schedule: diffusion.NoiseSchedule) -> np.ndarray:
    """The FP reference sampler's steps: `DDIMScheduler.set_timesteps(reference_steps)` for the model's schedule
    (spacing and steps_offset of its scheduler config)."""
    return schedule.default_timesteps(c.reference_steps)


def teacher_key(c, problem: Problem, noise_set: NoiseSet) -> dict:
    return cache_key("teacher", c, problem.checkpoint_sha, noise=noise_set.describe(),
                     timesteps=reference_timesteps(c, problem.spec.schedule).tolist())


def teacher_images(c, problem: Problem, evaluator: Evaluator, noise_set: NoiseSet, workdir: Path) -> np.ndarray:
    """The FP reference sampler's images on `noise_set`, computed once and cached in the workdir."""
    key = teacher_key(c, problem, noise_set)
    path = workdir / f"teacher_{noise_set.purpose}_{cache_tag(key)}.npz"
    if path.exists():
        with np.load(path) as z:
            images = z["images"]
            stored = json.loads(str(z["cache_key"])) if "cache_key" in z else None
        if (not key_diff(stored, key) and images.shape == (noise_set.n, *problem.spec.image_shape)
                and np.isfinite(images).all()):
            evaluator.teachers[noise_set] = images
            return images
    print(f"FP teacher: {c.reference_steps} DDIM steps on {noise_set}", flush=True)
    images = evaluator.sample_fp(reference_timesteps(c, problem.spec.schedule), noise_set)
    bad = ~np.isfinite(images).reshape(len(images), -1).all(axis=1)
    if bad.any():
        raise FloatingPointError(f"the FP teacher ({c.reference_steps} DDIM steps, {problem.spec.name}) made "
                                 f"non-finite images for {int(bad.sum())} of {len(images)} samples of {noise_set} "
                                 f"(first: #{int(np.flatnonzero(bad)[0])}); every paired score would be NaN. Check "
                                 "the model's params and scheduler config (e.g. zero terminal SNR with epsilon "
                                 "prediction) and config.matmul_precision")
    if checkpoint.is_primary():
        np.savez(path, images=images, cache_key=np.asarray(json.dumps(key, sort_keys=True)))
    evaluator.teachers[noise_set] = images
    return images


def make_teachers(c, problem: Problem, evaluator: Evaluator, metric_set: MetricSet, workdir: Path) -> dict:
    """Teacher images for every noise set a paired metric is computed on; the report set's is the FP reference."""
    sets = noise_sets(c)
    need = []
    if metric_set.fitness.paired:
        need += [NoiseSet(c.noise_seed, "fitness", n) for n in (tuple(c.fidelity_samples) or (c.search_samples,))]
        if c.algorithm == "local":  # the sensitivity probes' fitness noise
            need.append(NoiseSet(c.noise_seed, "fitness", c.sensitivity_samples))
    if metric_set.selection.paired:
        need.append(sets["select"])
    need.append(sets["report"])  # the FP reference row of the report
    return {s: teacher_images(c, problem, evaluator, s, workdir) for s in dict.fromkeys(need)}


# --- stage 5a: sensitivities and the knapsack start (algorithm 'local') ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sensitivities:
    """(L, B) fitness damage of each site's weights and activations at each bit choice (0 at the top), the probes'
    sampler runs, and the noise they were scored on."""

    w_damage: np.ndarray
    a_damage: np.ndarray
    runs: int
    noise: NoiseSet


SENSITIVITY_METRICS = ("fitness", "deviation", "one_step", "noise_model")
SENSITIVITY_SCORES = {"deviation": "deviation from the all-top images", "one_step": "one-step error from the FP run"}


def site_sensitivities(c, problem: Problem, evaluator: Evaluator, metric: Metric, workdir: Path) -> Sensitivities:
    """The all-top candidate and one probe per searched operand and probed bit-width (`sensitivity.probes`) on the
    fitness noise at `sensitivity_samples`, scored by `sensitivity_metric`: the fitness, the deviation of each
    probe's images from the all-top candidate's (`sensitivity.deviation_scores`), or its one-step error from the FP
    run's states (`Evaluator.step_errors`); cached in workdir/sensitivities.npz under a key of every setting that
    changes them. `noise_model` probes nothing (`sensitivity.noise_model_tables`)."""
    budget, space = problem.budget, problem.space
    noise = NoiseSet(c.noise_seed, "fitness", c.sensitivity_samples)
    how = c.get("sensitivity_metric", "fitness")
    if how == "noise_model":  # no probes, no sampler runs: the control of what the probes add
        print("sensitivities: the quantization-noise model MACs x (4^-b - 4^-top), no probes", flush=True)
        return Sensitivities(*sensitivity.noise_model_tables(budget), 0, noise)
    plist = sensitivity.probes(budget, c.sensitivity_probe_bits, c.sensitivity_mac_share)
    key = cache_key("samples", c, problem.checkpoint_sha, metric=metric.name if how == "fitness" else how,
                    noise=noise.describe(), probe_bits=sorted(c.sensitivity_probe_bits),
                    mac_share=c.sensitivity_mac_share, sites=list(problem.sites.paths))
    path = workdir / "sensitivities.npz"
    if path.exists():
        with np.load(path) as z:
            if str(z["key"]) == json.dumps(key, sort_keys=True):
                print(f"loading sensitivities from {path}", flush=True)
                return Sensitivities(z["w_damage"], z["a_damage"], int(z["runs"]), noise)
        print(f"sensitivities in {path} were made under other settings; measuring again", flush=True)
    w, a = sensitivity.probe_bits_arrays(budget, plist)
    w, a = np.vstack([np.zeros_like(w[:1]), w]), np.vstack([np.zeros_like(a[:1]), a])  # row 0: all at the top
    choices = np.asarray(space.bit_choices, np.int32)
    ts = np.broadcast_to(np.asarray(space.timesteps(space.seed())), (len(w), space.num_steps))
    n_sites = int(sensitivity.probed_sites(budget, c.sensitivity_mac_share).sum())
    print(f"sensitivities: {len(w)} probes (all-top, and one operand of one site at "
          f"{sorted(c.sensitivity_probe_bits)} bits; the {n_sites} largest of {len(budget.macs)} sites, "
          f"{c.sensitivity_mac_share:.0%} of the MACs) on {noise.n} fitness samples, by "
          f"{SENSITIVITY_SCORES[how] if how in SENSITIVITY_SCORES else metric.name}", flush=True)
    before = evaluator.sampled

    def rows(i, j):  # decoded probes i..j-1
        return ts[i:j], choices[w[i:j]], choices[a[i:j]]

    P = c.population_size
    if how == "fitness":
        scores = np.concatenate([evaluator.evaluate(*rows(i, i + P), noise, [metric])[:, 0]
                                 for i in tqdm(range(0, len(w), P), desc="sensitivities", unit="batch",
                                               mininterval=2.0)])
    elif how == "one_step":  # each probe's one-step error from the FP run's states (all-top first)
        scores = np.concatenate([evaluator.step_errors(ts[0], *rows(i, i + P)[1:], noise)
                                 for i in tqdm(range(0, len(w), P), desc="sensitivities", unit="batch",
                                               mininterval=2.0)])
    else:  # the all-top images first, then each batch of probes against them (never all images in memory)
        top = evaluator.sample(*rows(0, 1), noise)[0]
        scores = np.concatenate([np.zeros(1)] + [
            sensitivity.deviation_scores(top, evaluator.sample(*rows(i, i + P), noise))
            for i in tqdm(range(1, len(w), P), desc="sensitivities", unit="batch", mininterval=2.0)])
    runs = evaluator.sampled - before
    wd, ad = sensitivity.damage_tables(budget, plist, scores[1:], float(scores[0]))
    if checkpoint.is_primary():
        np.savez(path, w_damage=wd, a_damage=ad, runs=runs, key=np.asarray(json.dumps(key, sort_keys=True)))
    return Sensitivities(wd, ad, runs, noise)


def knapsack_start(c, problem: Problem, sens: Sensitivities, budget: Budget | None = None) -> list[Genome]:
    """The knapsack optima (DDIM-quad timesteps) of the additive damage under `budget` (default: the problem's),
    one per `knapsack_weights` entry."""
    budget = budget or problem.budget
    genomes, sols = knapsack.knapsack_genomes(budget, problem.space, sens.w_damage, sens.a_damage,
                                              tuple(c.knapsack_weights))
    for wt, sol in zip(c.knapsack_weights, sols):
        print(f"knapsack (weights' share {wt}): damage {sol.damage:.4g} (lower bound {sol.lower_bound:.4g}), "
              f"{sol.cost:,} of {budget.limit:,} BitOPs", flush=True)
    return genomes


def dp_timesteps(c, problem: Problem, evaluator: Evaluator, genome: Genome) -> Genome:
    """The genome with the timesteps `timestep_dp.chain_dp` chooses for its bits: `dp_per_group` candidate offsets
    per group, one-step errors of the quantized candidate against a fine FP teacher on `dp_samples` samples of the
    fitness noise (N x dp_per_group quantized UNet passes)."""
    space = problem.space
    offs = timestep_dp.candidate_offsets(space, c.dp_per_group)
    desc = [(np.asarray(space.starts[i]) + offs[i])[::-1] for i in reversed(range(space.num_steps))]
    noise, labels = purpose_noise(c.noise_seed, "fitness", c.dp_samples, evaluator.sample_shape,
                                  evaluator.num_classes)  # all dp_samples rows in one pass
    _, w_bits, a_bits = decode_np(space, jax.tree.map(lambda x: np.asarray(x)[None], genome))
    start, trans, final = sampling.quantized_step_costs(
        problem.apply_fn, problem.sites, evaluator.abar, problem.params, evaluator.tables, w_bits[0], a_bits[0], desc,
        noise, labels, problem.spec.schedule.sampler_kwargs())
    path, _ = timestep_dp.chain_dp(start, trans, final)  # sampling order: the top group first
    idx = np.asarray([offs[i][::-1][path[space.num_steps - 1 - i]] for i in range(space.num_steps)], np.int32)
    return genome.replace(timestep_idx=idx)


# --- stage 5: searches ----------------------------------------------------------------------------------------------


def search_settings(c) -> SearchSettings:
    return SearchSettings(c.noise_seed, tuple(c.fidelity_samples) or (c.search_samples,), c.fidelity_keep,
                          c.max_redraw, c.seed)


def single_axis_space(space: SearchSpace, name: str) -> SearchSpace:
    return space.restrict(**SINGLE_AXIS[name])


def run_searches(c, problem: Problem, evaluator: Evaluator, metric: Metric, workdir: Path, resume: bool,
                 warm_extra=(), sens: Sensitivities | None = None) -> dict[str, SearchResult]:
    """Single-axis searches (each repairs within its own space), then the joint search, warm-started from their
    bests and `warm_extra` if configured. A single-axis space whose seed cannot meet the budget is skipped and
    recorded as infeasible by the baselines stage. With sensitivities, every repaired genome of a space that
    searches bits also gets the exact knapsack fill of the budget it left (`local.make_fill`)."""
    fp = fingerprint(c, problem.checkpoint_sha)
    settings = search_settings(c)
    paths = tuple(problem.sites.paths)
    out = {}

    fill = local.make_fill(problem.budget, sens.w_damage, sens.a_damage) if sens is not None else None

    def refine(space):
        return fill if space.search_bits else None
    for name in [b for b in c.baselines if b in SINGLE_AXIS]:
        sub = single_axis_space(problem.space, name)
        if not SINGLE_AXIS[name]["search_bits"] and not problem.budget.is_feasible(sub.seed()):
            print(f"[{name}] skipped: the seed costs {problem.budget.cost_of(sub.seed()):,} BitOPs > budget "
                  f"{problem.budget.limit:,}, and this space cannot change bits", flush=True)
            continue
        print(f"baseline search {name}", flush=True)
        out[name] = evolve(name, make_algorithm(c, sub, paths), sub, problem.budget, evaluator, metric, settings,
                           c.generations, workdir, fp, resume, refine=refine(sub))
    warm = []
    if c.warm_start and c.algorithm in ("evolution", "local"):
        bests = [r.top_unique(1)[0][0] for r in out.values() if r.top_unique(1)]
        # the local search starts from the knapsack solutions and greedy_bits first (the seed is row 0)
        warm = list(warm_extra) + bests if c.algorithm == "local" else bests + list(warm_extra)
        warm = warm[: c.population_size - 1]
    out["joint"] = evolve("joint", make_algorithm(c, problem.space, paths), problem.space, problem.budget, evaluator,
                          metric, settings, c.generations, workdir, fp, resume, warm, refine=refine(problem.space))
    return out


# --- stage 5b: one front for every budget -------------------------------------------------------------------------


@dataclasses.dataclass
class CandidatePool:
    """Every distinct candidate a run scored on the fitness noise: its genome and space, decoded arrays, exact
    BitOPs and fitness (inf where infeasible or not at full fidelity)."""

    genomes: list  # (Genome, SearchSpace)
    timesteps: np.ndarray  # (P, N)
    w_bits: np.ndarray  # (P, L)
    a_bits: np.ndarray
    costs: np.ndarray  # int64 (P,)
    fitness: np.ndarray  # (P,)


def candidate_pool(problem: Problem, searches: dict[str, SearchResult], extra=()) -> CandidatePool:
    """The pool of `searches`' logs and of `extra` finalists, deduplicated by decoded candidate (first kept)."""
    rows, seen = [], set()

    def add(genomes, space, fit):  # a population (P, ...) of one space, decoded at once
        ts, wb, ab = decode_np(space, genomes)
        for i in range(len(fit)):
            key = candidate_key(ts[i], wb[i], ab[i])
            if key not in seen:
                seen.add(key)
                rows.append(((jax.tree.map(lambda x: x[i], genomes), space), ts[i], wb[i], ab[i], float(fit[i])))

    for f in extra:
        if f is not None and f.fitness is not None:
            add(jax.tree.map(lambda x: np.asarray(x)[None], f.genome), f.space, [f.fitness])
    for r in searches.values():
        flat, fit, scored = r.scored()
        add(jax.tree.map(lambda x: x[scored], flat), r.space, fit[scored])
    if not rows:
        raise RuntimeError("no candidate was scored: nothing to build a front from")
    g, ts, wb, ab, fit = zip(*rows)
    wb, ab = np.stack(wb), np.stack(ab)
    return CandidatePool(list(g), np.stack(ts), wb, ab, problem.budget.cost(wb, ab).astype(np.int64),
                         nan_to_inf(np.asarray(fit, np.float64)))


def budget_searches(c, problem: Problem, evaluator: Evaluator, metric: Metric, workdir: Path, resume: bool,
                    searches: dict[str, SearchResult], extra=(), sens: Sensitivities | None = None
                    ) -> dict[str, SearchResult]:
    """A search of `pareto_generations` at every budget of the front below or above the default, warm-started from
    that budget's greedy_bits, its knapsack optima (with sensitivities) and the run's best candidates so far
    repaired into it. Candidates are shared with every other budget through the pool and the evaluator's cache."""
    out: dict[str, SearchResult] = {}
    if c.pareto_generations < 1:
        return out
    space, paths = problem.space, tuple(problem.sites.paths)
    fp = fingerprint(c, problem.checkpoint_sha)
    for bud in problem.budgets:
        if bud.limit == problem.budget.limit:
            continue
        pool = candidate_pool(problem, {**searches, **out}, extra)
        order = [i for i in np.argsort(pool.fitness, kind="stable")[: c.population_size]
                 if np.isfinite(pool.fitness[i]) and pool.genomes[i][1].search_bits]
        warm = [bud.greedy_bits(space)] + (knapsack_start(c, problem, sens, bud) if sens is not None else [])
        fill = local.make_fill(bud, sens.w_damage, sens.a_damage) if sens is not None else None
        if order:
            best = stack_genomes([pool.genomes[i][0] for i in order])
            best, _, ok = bud.repair(best, space)
            best = fill(best) if fill is not None else best
            warm += [jax.tree.map(lambda x: x[j], best) for j in np.flatnonzero(ok)]
        name = f"budget_{bud.limit}"
        print(f"front: search at {bud.limit:,} BitOPs ({bud.limit / problem.budget.limit:.3g}x the budget), "
              f"{c.pareto_generations} generation(s), {min(len(warm), c.population_size - 1)} warm starts",
              flush=True)
        out[name] = evolve(name, make_algorithm(c, space, paths), space, bud, evaluator, metric, search_settings(c),
                           c.pareto_generations, workdir, fp, resume, warm[: c.population_size - 1], refine=fill)
    return out


def front_finalists(c, problem: Problem, evaluator: Evaluator, metric: Metric, searches: dict[str, SearchResult],
                    best: Finalist, extra=()) -> list[Finalist | None]:
    """One finalist per budget of the front (ascending): the default budget's is `best`; the others are the best on
    the select noise of the pool's top `rescore_top_k` that fit that budget (None if none fits) and of the points
    already chosen for smaller budgets (they fit too): a larger budget's point is never worse there than a smaller
    one's (`best` is a warm start the pool's top-k may not hold)."""
    pool = candidate_pool(problem, searches, extra)
    picks = pareto.best_per_budget(pool.costs, pool.fitness, [b.limit for b in problem.budgets], c.rescore_top_k)
    out: list[Finalist | None] = []
    for bud, idx in zip(problem.budgets, picks):
        if bud.limit == problem.budget.limit:
            out.append(best)
            continue
        own = None
        if len(idx):
            sel = nan_to_inf(evaluator.evaluate(pool.timesteps[idx], pool.w_bits[idx], pool.a_bits[idx],
                                                noise_sets(c)["select"], [metric])[:, 0])
            j = int(np.argmin(sel))
            genome, space = pool.genomes[idx[j]]
            own = Finalist(genome, space, _num(pool.fitness[idx[j]]), _num(sel[j]),
                           f"best of {len(idx)} by {metric.name} on the select noise, of every candidate the run "
                           f"scored within {bud.limit:,} BitOPs")
        smaller = [f for f in out if f is not None and f.selection is not None]
        prev = min(smaller, key=lambda f: f.selection, default=None)
        if prev is not None and (own is None or own.selection is None or prev.selection < own.selection):
            own = dataclasses.replace(prev, note=f"the point of a smaller budget: better by {metric.name} on the "
                                                 f"select noise than this budget's own candidates; {prev.note}")
        out.append(own)
    return out


# --- stage 6: rescore (selection) --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Finalist:
    """A chosen candidate, with the numbers that chose it (fitness and selection noise)."""

    genome: Genome
    space: SearchSpace
    fitness: float | None  # on the fitness noise
    selection: float | None  # on the select noise (top-k re-scoring); None if not re-scored
    note: str = ""


def rescore(c, evaluator: Evaluator, metric: Metric, result: SearchResult, incumbents=()) -> Finalist:
    """Re-score the top-k distinct candidates on the select noise; the best there wins (TMPQ-DM Sec. 4).

    `incumbents` (Finalists of the same space, e.g. greedy_bits of the warm start) join the re-scoring when they are
    not among the top-k: a search whose top-k won on the fitness samples alone (more candidates than samples) then
    returns its incumbent, unless a candidate of its own also wins on the select noise."""
    top = result.top_unique(c.rescore_top_k)
    if not top:
        raise RuntimeError(f"search {result.name!r} found no feasible candidate in {c.generations} generations; "
                           "raise the budget")
    seen = {genome_key(g) for g, _ in top}
    extra = [(jax.tree.map(np.asarray, f.genome), f.fitness) for f in incumbents
             if f is not None and f.space == result.space and genome_key(f.genome) not in seen]
    rows = top + extra
    genomes = stack_genomes([g for g, _ in rows])
    sel = score_on(c, evaluator, result.space, genomes, "select", metric)
    i = int(np.argmin(sel))
    note = f"best of {len(top)} by {metric.name} on the select noise"
    if extra:
        note += f" and {len(extra)} incumbent(s)" + (" (an incumbent won)" if i >= len(top) else "")
    return Finalist(jax.tree.map(lambda x: x[i], genomes), result.space, rows[i][1], _num(sel[i]), note)


# --- stage 7: baselines -------------------------------------------------------------------------------------------------


def greedy_variants(space: SearchSpace, budget: Budget) -> list[tuple[Genome, int | None]]:
    """(genome, activation start) of `greedy_bits` from the lowest activation choice (start None) and from the
    next one up, where there is one."""
    choices = space.bit_choices
    starts = [None] + ([choices[-2]] if len(choices) > 1 else [])
    return [(budget.greedy_bits(space, a), a) for a in starts]


def score_on(c, evaluator: Evaluator, space: SearchSpace, pop: Genome, purpose: str, metric: Metric) -> np.ndarray:
    """(P,) scores of a host population by `metric` on the run's noise set of `purpose` (cached; NaN -> inf)."""
    return nan_to_inf(evaluator.evaluate(*decode_np(space, pop), noise_sets(c)[purpose], [metric])[:, 0])


def greedy_finalist(c, problem: Problem, evaluator: Evaluator, metric: Metric,
                    select: Metric | None = None) -> Finalist | None:
    """`greedy_bits`: lowest bits, then the smallest sites raised to the highest choice within the budget; also
    with activations starting one choice higher. Both are scored on the fitness noise; when both are feasible the
    select noise picks one, as `rescore` picks a search's winner (the fitness samples alone overfit the choice)."""
    space, budget = problem.space, problem.budget
    choices = space.bit_choices
    rows = [(g, a) for g, a in greedy_variants(space, budget) if budget.is_feasible(g)]
    if not rows:
        return None
    pop = stack_genomes([g for g, _ in rows])
    fit = score_on(c, evaluator, space, pop, "fitness", metric)
    if len(rows) == 1:
        i, sel, by = 0, None, "the only feasible one"
    else:
        by_metric = select or metric
        scores = score_on(c, evaluator, space, pop, "select", by_metric)
        i = int(np.argmin(scores))
        sel, by = _num(scores[i]), f"better of {len(rows)} by {by_metric.name} on the select noise"
    return Finalist(rows[i][0], space, _num(fit[i]), sel,
                    f"greedy, activations from {rows[i][1] or choices[-1]} bits; {by}")


def knapsack_finalist(c, problem: Problem, evaluator: Evaluator, metric: Metric, genomes: list[Genome],
                      select: Metric | None = None) -> Finalist | None:
    """`knapsack`: the exact knapsack optima of the additive damage (`knapsack_start`, DDIM-quad timesteps), one per
    `knapsack_weights` entry, scored on the fitness noise; the best of them on the select noise (by `select`, None:
    the fitness), as `rescore` picks a search's winner. The local search's start without its search."""
    space = problem.space
    if not genomes:
        return None
    pop = stack_genomes(genomes)
    fit = score_on(c, evaluator, space, pop, "fitness", metric)
    by_metric = select or metric
    scores = score_on(c, evaluator, space, pop, "select", by_metric)
    i = int(np.argmin(scores))
    weight = list(c.knapsack_weights)[i] if i < len(c.knapsack_weights) else None
    return Finalist(jax.tree.map(lambda x: x[i], pop), space, _num(fit[i]), _num(scores[i]),
                    f"knapsack optimum (weights' share {weight}); best of {len(genomes)} by {by_metric.name} on the "
                    "select noise")


def baseline_finalists(c, problem: Problem, evaluator: Evaluator, metric: Metric,
                       searches: dict[str, SearchResult], greedy: Finalist | None = None,
                       select: Metric | None = None, knapsack_genomes=()) -> dict[str, Finalist | None]:
    """Finalists of every configured baseline; `greedy` reuses a greedy_bits finalist made earlier, and
    `knapsack_genomes` are the knapsack optima of the run's sensitivities. `metric` is the fitness, `select` the
    re-scoring metric (None: the fitness)."""
    out = {}
    fitness_set = noise_sets(c)["fitness"]
    for name in c.baselines:
        if name.startswith("uniform_"):
            g = jax.tree.map(np.asarray, problem.space.uniform_bits(uniform_bits(name)))
            pop = jax.tree.map(lambda x: x[None], g)
            fit = nan_to_inf(evaluator.evaluate(*decode_np(problem.space, pop), fitness_set, [metric])[0, 0])
            out[name] = Finalist(g, problem.space, _num(fit), None, "fixed")
        elif name == "greedy_bits":
            out[name] = greedy if greedy is not None else greedy_finalist(c, problem, evaluator, metric, select)
        elif name == "knapsack":
            out[name] = knapsack_finalist(c, problem, evaluator, metric, list(knapsack_genomes), select)
        else:
            out[name] = rescore(c, evaluator, select or metric, searches[name]) if name in searches else None
    return out


# --- stage 8: report ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    entries: dict  # name -> results.json entry
    images: dict  # name -> report-noise images in [-1, 1]


def describe(problem: Problem, c, f: Finalist) -> dict:
    ts, wb, ab = (x[0] for x in decode_np(f.space, jax.tree.map(lambda x: np.asarray(x)[None], f.genome)))
    wb, ab = problem.budget.resolve(wb, ab)
    cost = int(problem.budget.cost(wb, ab))
    ref = quant.fp_bitops(problem.sites, c.reference_steps)
    return {"timesteps": ts.tolist(), "w_bits": dict(zip(problem.sites.paths, wb.tolist())),
            "a_bits": dict(zip(problem.sites.paths, ab.tolist())), "bitops": cost, "bitops_reduction": ref / cost,
            "within_budget": bool(cost <= problem.budget.limit),
            "mean_w_bits": float(np.average(wb, weights=problem.sites.macs)),
            "mean_a_bits": float(np.average(ab, weights=problem.sites.macs)),
            "search": {"metric": c.metric, "select_metric": select_metric_name(c), "fitness": f.fitness,
                       "selection": f.selection, "note": f.note,
                       "fitness_noise": noise_sets(c)["fitness"].describe(),
                       "select_noise": noise_sets(c)["select"].describe()}}


def report(c, problem: Problem, evaluator: Evaluator, metric_set: MetricSet, finalists: dict[str, Finalist | None],
           teachers: dict) -> Report:
    """Sample every finalist and the FP reference on the report noise; score with the report metrics (and the
    fitness metric) against the report reference. Nothing here feeds back into any selection."""
    report_set = noise_sets(c)["report"]
    # the report metrics (report reference); a paired fitness too (its reference is the FP teacher, not data)
    metric_list = list(metric_set.reports) + ([metric_set.fitness] if metric_set.fitness.paired and
                                               metric_set.fitness.name not in {m.name for m in metric_set.reports}
                                               else [])
    entries, images = {}, {}
    ref_images = teachers[report_set]
    entries["reference"] = {"steps": c.reference_steps,
                            "timesteps": reference_timesteps(c, problem.spec.schedule).tolist(),
                            "bitops": quant.fp_bitops(problem.sites, c.reference_steps)}
    images["reference"] = ref_images
    todo = {k: f for k, f in finalists.items() if f is not None}
    for name, f in finalists.items():
        if f is None:
            entries[name] = {"infeasible": True, "reason": "this space cannot meet the budget (or none found)"}
    ts, wb, ab, row_of = [], [], [], {}  # each distinct candidate is sampled once
    for k, f in todo.items():
        t, w, a = (x[0] for x in decode_np(f.space, jax.tree.map(lambda x: np.asarray(x)[None], f.genome)))
        sig = candidate_key(t, w, a)
        if sig not in row_of:
            row_of[sig] = len(ts)
            ts.append(t), wb.append(w), ab.append(a)
        row_of[k] = row_of[sig]
    print(f"report: {len(ts)} distinct candidates ({len(todo)} names) + FP reference on {report_set}", flush=True)
    cand_images = evaluator.sample(np.stack(ts), np.stack(wb), np.stack(ab), report_set)
    all_images = {"reference": ref_images, **{k: cand_images[row_of[k]] for k in todo}}
    digests, done = {}, {}
    for name, ims in tqdm(all_images.items(), desc="report metrics", unit="set"):
        d = hashlib.sha256(np.ascontiguousarray(ims).tobytes()).hexdigest()
        if d not in done:
            done[d] = evaluator.score_images(ims[None], report_set, metric_list)[0]
        digests[name] = d
        if name != "reference":
            entries[name] = describe(problem, c, todo[name])
            images[name] = ims
        entries[name]["report"] = {
            m.name: {"value": _num(v), **report_set.describe(),
                     "reference": f"FP teacher ({c.reference_steps} steps)" if m.paired else c.report_reference}
            for m, v in zip(metric_list, done[d])}
    return Report(entries, images)


def _num(x):
    x = float(x)
    return x if math.isfinite(x) else None


# --- the job --------------------------------------------------------------------------------------------------------


def run_search(config: ml_collections.ConfigDict, workdir: str, resume: bool = False) -> dict:
    validate_config(config)
    with jax.default_matmul_precision(config.get("matmul_precision", "highest")):
        return _run_search(config, workdir, resume)


def _run_search(c: ml_collections.ConfigDict, workdir: str, resume: bool) -> dict:
    if c.multihost:
        jax.distributed.initialize()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if resume:  # refuse a changed config before any long work
        fp = fingerprint(c, model_sha(c))
        for path in sorted(workdir.glob("search_*.json")):
            check_fingerprint(path, fp)
    timing: dict[str, float] = {}
    t_all = t0 = time.time()

    def lap(name):
        nonlocal t0
        timing[f"{name}_seconds"] = time.time() - t0
        t0 = time.time()

    problem = build_problem(c, workdir)
    lap("load")
    metric_set = build_metrics(c)
    lap("metric_setup")
    tables = calibrate(c, problem, workdir)
    lap("calibration")
    evaluator = make_evaluator(c, problem, tables)
    teachers = make_teachers(c, problem, evaluator, metric_set, workdir)
    lap("teacher")
    greedy = (greedy_finalist(c, problem, evaluator, metric_set.fitness, metric_set.selection)
              if "greedy_bits" in c.baselines else None)
    sens, start, knapsack_optima = None, [], []
    if c.algorithm == "local" or "knapsack" in c.baselines:
        sens = site_sensitivities(c, problem, evaluator, metric_set.fitness, workdir)
        knapsack_optima = knapsack_start(c, problem, sens)
        timing["sensitivity_runs"] = sens.runs
    if c.algorithm == "local":
        start = list(knapsack_optima)
        if problem.space.search_timesteps and c.dp_per_group > 1:  # steps for the bits of the middle weighting
            start.append(dp_timesteps(c, problem, evaluator, start[len(start) // 2]))
            print(f"timestep DP for the knapsack bits: {decode_np(problem.space, start[-1])[0].tolist()}", flush=True)
    if sens is not None:
        lap("sensitivities")
    search_sens = sens if c.algorithm == "local" else None  # the reference GA keeps its own repair
    searches = run_searches(c, problem, evaluator, metric_set.fitness, workdir, resume,
                            start + ([greedy.genome] if greedy is not None else []), search_sens)
    lap("search")
    searches.update(budget_searches(c, problem, evaluator, metric_set.fitness, workdir, resume, searches, [greedy],
                                    search_sens))
    lap("front_search")
    n_evals = sum(int((r.log["level"] >= 0).sum()) for r in searches.values())
    timing["candidates_per_second"] = n_evals / max(sum(float(r.log["seconds"].sum()) for r in searches.values()),
                                                    1e-9)
    incumbents = [greedy] if c.get("rescore_incumbents", False) else []
    if c.get("rescore_starts", False) and start:  # the warm start: a search that only drifted from it returns it
        fit = score_on(c, evaluator, problem.space, stack_genomes(start), "fitness",
                       metric_set.fitness)  # cached where the search scored it
        incumbents += [Finalist(jax.tree.map(np.asarray, g), problem.space, _num(f), None, "warm start")
                       for g, f in zip(start, fit)]
    best = rescore(c, evaluator, metric_set.selection, searches["joint"], incumbents)
    front = front_finalists(c, problem, evaluator, metric_set.selection, searches, best, [greedy])
    lap("rescore")
    baselines = baseline_finalists(c, problem, evaluator, metric_set.fitness, searches, greedy, metric_set.selection,
                                   knapsack_optima)
    lap("baselines")
    front_names = {f"pareto_{i}": f for i, f in enumerate(front)}
    rep = report(c, problem, evaluator, metric_set, {"best": best, **baselines, **front_names}, teachers)
    lap("report")
    timing["total_seconds"] = time.time() - t_all
    timing["sampling_runs"] = evaluator.sampled

    histories = [h for r in searches.values() for h in r.history]
    sets = noise_sets(c)
    results = {
        "config": c.to_dict(),
        "model": {**problem.spec.describe(), "params": models.count_params(problem.params),
                  "macs_per_step": int(problem.sites.macs.sum()), "quantized_sites": len(problem.sites),
                  "sites": dict(zip(problem.sites.paths, problem.sites.macs.tolist()))},
        "budget_bitops": problem.budget.limit,
        "bitops_definition": (f"sum over quantized sites of MACs x w_bits x a_bits, per image, over all sampling steps; "
                              f"{problem.spec.unet_passes_per_step} UNet pass(es) per step"
                              + (f" (classifier-free guidance {problem.spec.guidance_scale})"
                                 if problem.spec.unet_passes_per_step > 1 else "")
                              + ("; the VAE decoder runs in full precision and is not counted"
                                 if problem.spec.decoder else "")),
        "matmul_precision": c.get("matmul_precision", "highest"),
        "prompts": list(problem.prompts),
        "noise": {k: v.describe() for k, v in sets.items()},
        "references": {"fitness": c.fitness_reference, "report": c.report_reference},
        "reference": rep.entries["reference"], "best": rep.entries["best"],
        "baselines": {k: rep.entries[k] for k in baselines},
        "pareto": front_entries(problem, rep.entries, front),
        "history": [h for h in histories if h["search"] == "joint"],
        "baseline_history": [h for h in histories if h["search"] != "joint"],
        "timing": timing, "metric_name": metric_set.fitness.name,
        "report_metric_names": list(dict.fromkeys(n for e in rep.entries.values() for n in e.get("report", {}))),
        "devices": [d.device_kind for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "strategy": quant.auto_strategy() if c.strategy == "auto" else c.strategy,
    }
    write_outputs(workdir, results, histories, rep.images, searches)
    return results


def front_entries(problem: Problem, entries: dict, front: list[Finalist | None]) -> list[dict]:
    """results.json["pareto"]: one entry per budget (ascending), with `on_front` for the points no other chosen point
    dominates in (BitOPs, select-noise score)."""
    out = []
    for i, (bud, f) in enumerate(zip(problem.budgets, front)):
        e = dict(entries[f"pareto_{i}"])
        e.update(budget=bud.limit, budget_fraction=bud.limit / problem.budget.limit)
        out.append(e)
    ok = [i for i, e in enumerate(out) if not e.get("infeasible")]
    score = [out[i]["search"]["selection"] if out[i]["search"]["selection"] is not None
             else out[i]["search"]["fitness"] for i in ok]
    flags = pareto.front_flags([out[i]["bitops"] for i in ok], [np.nan if v is None else v for v in score])
    for i, on in zip(ok, flags):
        out[i]["on_front"] = bool(on)
    return out


def write_outputs(workdir: Path, results: dict, histories: list, images: dict, searches: dict) -> None:
    """results.json, history, samples, grids and plots (process 0 only in a multi-host run)."""
    if not checkpoint.is_primary():
        return
    checkpoint.write_json(workdir / "results.json", results)
    with open(workdir / "history.jsonl", "w") as f:
        for h in histories:
            f.write(json.dumps(h) + "\n")
    for name, ims in images.items():
        unit = data.to_unit_range(ims)
        np.savez_compressed(workdir / f"samples_{name}.npz", images=unit)
        save_grid(workdir / f"samples_{name}.png", unit[:100], ncols=10)
    save_plots(workdir, histories, {k: r.log for k, r in searches.items()}, results)
    print(summary_table(results), flush=True)


def summary_table(results: dict) -> str:
    """One row per reported candidate: BitOPs, reduction vs FP32, and each report metric (report noise)."""
    names = results["report_metric_names"]
    rows = {"reference": results["reference"], "best": results["best"], **results["baselines"],
            **{f"pareto_{i}" + ("" if e.get("on_front", True) else " (dominated)"): e
               for i, e in enumerate(results.get("pareto", []))}}
    fp = results["reference"]["bitops"]
    out = [f"{'':22s} {'BitOPs':>10s} {'vs FP32':>8s} " + " ".join(f"{n:>18s}" for n in names)]
    for name, e in rows.items():
        if e.get("infeasible"):
            out.append(f"{name:22s} infeasible: {e['reason']}")
            continue
        vals = [e["report"].get(n, {}).get("value") for n in names]
        out.append(f"{name:22s} {e['bitops']:10.4g} {fp / e['bitops']:7.0f}x " +
                   " ".join(f"{v:18.4f}" if v is not None else f"{'-':>18s}" for v in vals))
    rep = results["noise"]["report"]
    return (f"held-out report: n={rep['n']}, noise seed {rep['noise_seed']} (purpose 'report'), reference "
            f"{results['references']['report']}:\n" + "\n".join(out))
