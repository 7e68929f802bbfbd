"""Sampling with quantized candidates: the DDIM sampler (tmpq_jax.diffusion) over a fake-quantized UNet
(tmpq_jax.quant), for one candidate or a population. `quant` itself knows nothing of sampling.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax import diffusion, quant
from tmpq_jax.quant import QuantTables, SiteTable


def sample_candidate(apply_fn: Callable, sites: SiteTable, abar: jax.Array, params: Any, tables: QuantTables,
                     w_bits: jax.Array, a_bits: jax.Array, timesteps: jax.Array, noise: jax.Array,
                     labels: jax.Array, sampler_kwargs: dict | None = None) -> jax.Array:
    """DDIM samples of one candidate (timesteps, w_bits, a_bits). Weights are quantized once per run.

    `sampler_kwargs`: the schedule's DDIM settings (`NoiseSchedule.sampler_kwargs()`: prediction type, clipping).

    Concrete bits are checked against the tables (ValueError); traced uncalibrated bits give NaN samples.
    """
    cand = quant.gather_candidate(tables, sites, w_bits, a_bits)
    qparams = quant.quantize_params(params, sites, cand)
    qapply = quant.quantized_apply(apply_fn, sites, cand)
    return diffusion.ddim_sample(lambda x, t, y: qapply(qparams, x, t, y), abar, timesteps, noise, labels,
                                 **(sampler_kwargs or {}))


def make_population_sampler(apply_fn: Callable, sites: SiteTable, strategy: str = "auto", chunk_size: int = 1,
                            devices=None, sampler_kwargs: dict | None = None) -> Callable:
    """sampler((w_bits[P,L], a_bits[P,L], timesteps[P,N]), (abar, params, tables, noise, labels)) -> images[P,...].

    A concrete population is checked against the tables first (ValueError naming uncalibrated bit-widths); a traced
    one relies on the traced guard (NaN images for a candidate with an uncalibrated bit-width).
    """

    def one(w_bits, a_bits, timesteps, abar, params, tables, noise, labels):
        return sample_candidate(apply_fn, sites, abar, params, tables, w_bits, a_bits, timesteps, noise, labels,
                                sampler_kwargs)

    run = quant.population_fn(one, strategy, chunk_size, devices)

    def sampler(pop, shared):
        quant.check_candidate_bits_if_concrete(sites, shared[2], pop[0], pop[1])
        return run(pop, shared)

    return sampler


def _step_settings(sampler_kwargs: dict | None):
    """(final_abar, clip_x0, out_range, step kwargs) of one DDIM step as `diffusion.ddim_sample` takes them from
    `sampler_kwargs`: out_range is the sampler's output range after its last step (1.0 where clip_x0 is False)."""
    kw = dict(sampler_kwargs or {})
    clip_x0 = kw.get("clip_x0", True)
    return (kw.get("final_abar", 1.0), clip_x0, diffusion._clip_range(True if clip_x0 is False else clip_x0),
            {k: kw[k] for k in ("prediction_type", "clipped_eps") if k in kw})


def fp_step_targets(apply_fn: Callable, abar: jax.Array, params: Any, timesteps: jax.Array, noise: jax.Array,
                    labels: Any, sampler_kwargs: dict | None = None) -> tuple[jax.Array, jax.Array]:
    """The FP DDIM run over `timesteps`: its states x_t (N, n, ...) (the UNet's input at each step) and the state
    after each step (N, n, ...): the next step's input, the (range-clipped) sample after the last."""
    final, traj = diffusion.ddim_sample(lambda x, t, y: apply_fn(params, x, t, y), abar, timesteps, noise, labels,
                                        return_trajectory=True, **(sampler_kwargs or {}))
    return traj.x, jnp.concatenate([traj.x[1:], final[None]])


def make_population_step_errors(apply_fn: Callable, sites: SiteTable, strategy: str = "auto", chunk_size: int = 1,
                                devices=None, sampler_kwargs: dict | None = None) -> Callable:
    """errors((w_bits[P,L], a_bits[P,L]), (abar, params, tables, timesteps[N], states, targets, labels)) -> (P, n).

    Each candidate's one-step error from an FP run's `states` (`fp_step_targets`): one quantized DDIM step from the
    FP state at every step, its squared distance to the FP's next state (`targets`), averaged over the steps and
    each sample's pixels. Errors do not compound along a trajectory, so a small quantization change gives a small
    error (the local error of GITS-style step costs; `search.sensitivity`).
    """
    final_abar, clip_x0, out_range, step_kw = _step_settings(sampler_kwargs)

    def one(w_bits, a_bits, abar, params, tables, timesteps, states, targets, labels):
        cand = quant.gather_candidate(tables, sites, w_bits, a_bits)
        qparams = quant.quantize_params(params, sites, cand)
        qapply = quant.quantized_apply(apply_fn, sites, cand)
        abar = jnp.asarray(abar, states.dtype)
        abar_t = abar[timesteps]
        abar_next = jnp.concatenate([abar_t[1:], jnp.full((1,), final_abar, abar.dtype)])
        last = jnp.arange(timesteps.shape[0]) == timesteps.shape[0] - 1

        def step(args):
            x, t, a_t, a_next, is_last, target = args
            eps = qapply(qparams, x, jnp.full((x.shape[0],), t, jnp.int32), labels)
            x_next, _ = diffusion.ddim_step(x, eps, a_t, a_next, clip_x0, **step_kw)
            if out_range is not None:  # the sampler's output range after its last step
                x_next = jnp.where(is_last, jnp.clip(x_next, -out_range, out_range), x_next)
            return jnp.mean((x_next - target) ** 2, axis=tuple(range(1, x.ndim)))

        return jnp.mean(jax.lax.map(step, (states, timesteps, abar_t, abar_next, last, targets)), axis=0)

    run = quant.population_fn(one, strategy, chunk_size, devices)

    def errors(pop, shared):
        quant.check_candidate_bits_if_concrete(sites, shared[2], pop[0], pop[1])
        return run(pop, shared)

    return errors


def quantized_step_costs(apply_fn: Callable, sites: SiteTable, abar: jax.Array, params: Any, tables: QuantTables,
                         w_bits, a_bits, group_timesteps: list, noise: jax.Array, labels: Any,
                         sampler_kwargs: dict | None = None) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """One-step errors of a quantized candidate against a fine FP teacher (`search.timestep_dp`).

    group_timesteps: candidate timesteps of each group in sampling order (descending t). The teacher is FP DDIM
    through all of them, from `noise`. Returns (start (K_0,) zeros, transitions[j] (K_j, K_{j+1}), final
    (K_last,)): the mean squared error of one quantized DDIM step from the teacher's state at a source (the noise
    itself for the first group) to the teacher's state at each target, or to the teacher's final sample.
    """
    final_abar, clip_x0, out_range, step_kw = _step_settings(sampler_kwargs)
    fine = np.concatenate([np.asarray(g, np.int32) for g in group_timesteps])
    if np.any(np.diff(fine) >= 0):
        raise ValueError("group timesteps must be strictly descending across groups, in sampling order")
    abar = jnp.asarray(abar, noise.dtype)
    final_fp, traj = jax.jit(lambda p, ts, z, y: diffusion.ddim_sample(
        lambda x, t, yy: apply_fn(p, x, t, yy), abar, ts, z, y, return_trajectory=True, **(sampler_kwargs or {})))(
        params, jnp.asarray(fine), noise, labels)
    states = dict(zip(fine.tolist(), traj.x))  # the teacher's input at each fine timestep
    cand = quant.gather_candidate(tables, sites, jnp.asarray(w_bits, jnp.int32), jnp.asarray(a_bits, jnp.int32))
    qparams = quant.quantize_params(params, sites, cand)
    qapply = quant.quantized_apply(apply_fn, sites, cand)

    def errors(x, t, abar_next, targets, last):
        eps = qapply(qparams, x, jnp.full((x.shape[0],), t, jnp.int32), labels)

        def one(a_next, target):
            x_next, _ = diffusion.ddim_step(x, eps, abar[t], a_next, clip_x0, **step_kw)
            if last and out_range is not None:  # the sampler's output range after its last step
                x_next = jnp.clip(x_next, -out_range, out_range)
            return jnp.mean((x_next - target) ** 2)

        return jax.vmap(one)(abar_next, targets)

    errors = jax.jit(errors, static_argnums=4)

    transitions, final = [], None
    for j, src in enumerate(group_timesteps):
        last = j == len(group_timesteps) - 1
        if last:
            a_next = jnp.full((1,), final_abar, abar.dtype)
            targets = final_fp[None]
        else:
            nxt = np.asarray(group_timesteps[j + 1], np.int32)
            a_next = abar[jnp.asarray(nxt)]
            targets = jnp.stack([states[int(t)] for t in nxt])
        rows = []
        for t in np.asarray(src, np.int32):
            x = noise if j == 0 else states[int(t)]
            rows.append(np.asarray(errors(x, jnp.int32(t), a_next, targets, last), np.float64))
        if last:
            final = np.concatenate(rows)
        else:
            transitions.append(np.stack(rows))
    return np.zeros(len(group_timesteps[0])), transitions, final
