"""Sampling with quantized candidates: the DDIM sampler (tmpq_jax.diffusion) over a fake-quantized UNet
(tmpq_jax.quant), for one candidate or a population. `quant` itself knows nothing of sampling.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

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
