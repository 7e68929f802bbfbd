"""DDPM training objective and the DDIM (eta = 0) sampler over an arbitrary descending list of timesteps.

Notation follows Ho et al. (2020) and Song et al. (2021, "DDIM", eq. 12 with sigma = 0):
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_theta,
with abar_prev = 1 after the last step, so the sampler returns x0_hat of the last step. Options for other models:
v-prediction (Salimans & Ho 2022, Sec. 4 and Appendix D) and x0-prediction, abar_prev after the last step (`final_abar`,
diffusers' `final_alpha_cumprod`), no clipping for latents, and classifier-free guidance (Ho & Salimans 2022).
A model's settings come from `NoiseSchedule.sampler_kwargs()`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.diffusion.schedule import NoiseSchedule

NUM_TRAIN_TIMESTEPS = 1000

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x_t, t[B], labels[B]) -> eps


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 1e-4, beta_end: float = 0.02):
    """DDPM's linear beta schedule, in float64."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def alphas_cumprod(num_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s), float64 (cast when used)."""
    return np.cumprod(1.0 - linear_betas(num_timesteps, beta_start, beta_end))


def q_sample(abar: jax.Array, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Forward process x_t given x_0 (DDPM eq. 4)."""
    a = abar[t].reshape(-1, *([1] * (x0.ndim - 1)))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def eps_loss(eps_fn: EpsFn, abar: jax.Array, key: jax.Array, x0: jax.Array, labels: jax.Array) -> jax.Array:
    """The simple epsilon-prediction loss (DDPM eq. 14), t uniform over the training steps."""
    kt, kn = jax.random.split(key)
    t = jax.random.randint(kt, (x0.shape[0],), 0, abar.shape[0])
    noise = jax.random.normal(kn, x0.shape, x0.dtype)
    return jnp.mean((eps_fn(q_sample(abar, x0, t, noise), t, labels) - noise) ** 2)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _clip_range(clip_x0) -> float | None:
    """x0 clipping range of `clip_x0`: True -> 1.0, False/None -> None, a number r > 0 -> r."""
    if clip_x0 is None or clip_x0 is False:
        return None
    if clip_x0 is True:
        return 1.0
    r = float(clip_x0)
    if not 0.0 < r < float("inf"):
        raise ValueError(f"clip_x0={clip_x0!r} is invalid; valid: True, False, None or a finite range > 0")
    return r


def ddim_step(x: jax.Array, eps: jax.Array, abar_t: jax.Array, abar_prev: jax.Array,
              clip_x0: bool | float | None = True, *, prediction_type: str = "epsilon", clipped_eps: bool = True):
    """One deterministic DDIM update (eta = 0). Returns (x_prev, x0_hat).

    `eps` is the model output: epsilon, v (x0 = sqrt(abar) x - sqrt(1-abar) v, eps = sqrt(1-abar) x + sqrt(abar) v;
    Salimans & Ho 2022, Sec. 4) or x0 (`prediction_type` 'sample'). `clip_x0` (True: 1.0, a range r, or
    False/None for none) clips x0_hat to [-r, r] and, if `clipped_eps`, re-derives eps from it (diffusers' DDIM
    keeps the model's eps: `use_clipped_model_output=False`).
    """
    # 1. x0_hat and eps_hat from the model output
    if prediction_type == "epsilon":
        x0 = (x - jnp.sqrt(1.0 - abar_t) * eps) / jnp.sqrt(abar_t)
    elif prediction_type == "v_prediction":
        v = eps
        x0 = jnp.sqrt(abar_t) * x - jnp.sqrt(1.0 - abar_t) * v
        eps = jnp.sqrt(1.0 - abar_t) * x + jnp.sqrt(abar_t) * v
    elif prediction_type == "sample":
        x0 = eps
        eps = (x - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1.0 - abar_t)
    else:
        raise ValueError(f"unsupported prediction_type={prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
    # 2. clip x0_hat (pixels only) and keep x_t consistent with it
    r = _clip_range(clip_x0)
    if r is not None:
        x0 = jnp.clip(x0, -r, r)
        if clipped_eps:
            eps = (x - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1.0 - abar_t)
    # 3. DDIM eq. 12, sigma = 0
    return jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev) * eps, x0


class Trajectory(NamedTuple):
    """Per-step UNet inputs of a sampling run: x_t (N, B, H, W, C) and t (N,)."""

    x: jax.Array
    t: jax.Array


def ddim_sample(eps_fn: EpsFn, abar: jax.Array, timesteps: jax.Array, noise: jax.Array, labels: jax.Array,
                clip_x0: bool | float | None = True, return_trajectory: bool = False, *,
                prediction_type: str = "epsilon", final_abar: float | jax.Array = 1.0, clipped_eps: bool = True):
    """DDIM (eta = 0) from `noise` over `timesteps` (N,), strictly descending ints in [0, T).

    A pure function of its arrays: jit it, vmap it over a population of timestep lists, or `lax.map` it.
    `timesteps` is traced, so one compiled program serves every list of the same length. `labels` is passed to
    `eps_fn` as is (any pytree, e.g. the (cond, uncond) pair of `guided`).
    `clip_x0`: True (the default) clips x0_hat and the output to [-1, 1]; a number r clips both to [-r, r]; None
    clips nothing (latents); False leaves x0_hat unclipped but clips the output to [-1, 1] (existing callers).
    `prediction_type`, `clipped_eps`: see `ddim_step`. `final_abar`: abar_prev of the last step (diffusers'
    final_alpha_cumprod).
    Returns x_0 (and the Trajectory of UNet inputs if asked).
    """
    # 1. abar_t and abar_prev per step; abar_prev after the last step is final_abar
    timesteps = jnp.asarray(timesteps, jnp.int32)
    abar = jnp.asarray(abar, noise.dtype)
    abar_t = abar[timesteps]
    abar_prev = jnp.concatenate([abar_t[1:], jnp.full((1,), final_abar, abar.dtype)])
    out_range = 1.0 if clip_x0 is False else _clip_range(clip_x0)

    # 2. the DDIM chain
    def body(x, step):
        t, a_t, a_prev = step
        eps = eps_fn(x, jnp.full((x.shape[0],), t, jnp.int32), labels)
        x_prev, x0 = ddim_step(x, eps, a_t, a_prev, clip_x0, prediction_type=prediction_type,
                               clipped_eps=clipped_eps)
        return x_prev, (x if return_trajectory else None)

    x, xs = jax.lax.scan(body, noise, (timesteps, abar_t, abar_prev))
    # 3. output range (pixels) or none (latents)
    if out_range is not None:
        x = jnp.clip(x, -out_range, out_range)
    return (x, Trajectory(xs, timesteps)) if return_trajectory else x


def _check_guidance_scale(guidance_scale) -> float:
    s = float(guidance_scale)
    if not (math.isfinite(s) and s >= 1.0):
        raise ValueError(f"guidance_scale={guidance_scale!r} is invalid; valid: >= 1 (finite; 1 = no guidance)")
    return s


def passes_per_step(guidance_scale) -> int:
    """Batch multiplier of one sampling step: 2 with classifier-free guidance (scale > 1), else 1."""
    return 2 if _check_guidance_scale(guidance_scale) > 1.0 else 1


def guided(model_fn: EpsFn, guidance_scale) -> EpsFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6, s = 1 + w): out = u + s (c - u) on the model output.

    The returned fn takes `cond` = (cond, uncond), two pytrees of (B, ...) arrays (e.g. text embeddings). Scale 1
    runs the conditional model only; scale > 1 runs [uncond; cond] as one batch of 2B.
    """
    s = _check_guidance_scale(guidance_scale)

    def fn(x, t, cond):
        c, u = cond
        if s == 1.0:
            return model_fn(x, t, c)
        # one 2B batch: unconditional half first, as diffusers does
        cat = lambda a, b: jnp.concatenate([a, b], axis=0)  # noqa: E731
        out = model_fn(cat(x, x), cat(t, t), jax.tree.map(cat, u, c))
        out_u, out_c = jnp.split(out, 2, axis=0)
        return out_u + s * (out_c - out_u)

    return fn


def uniform_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """DDIM's uniform ('linear') schedule, descending: 0, c, 2c, ... reversed."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    c = num_train_timesteps // num_steps
    return (np.arange(num_steps) * c)[::-1].astype(np.int32)


def quad_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """DDIM's quadratic schedule (dense near t = 0), descending: floor(linspace(0, sqrt(0.8 T), N)^2)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ts = np.floor(np.linspace(0, np.sqrt(num_train_timesteps * 0.8), num_steps) ** 2).astype(np.int64)
    if len(np.unique(ts)) != num_steps:
        raise ValueError(f"the quadratic schedule repeats timesteps at num_steps={num_steps}; use fewer steps")
    return ts[::-1].astype(np.int32)


def validate_timesteps(timesteps, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or len(ts) == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D list, got shape {ts.shape}")
    if ts.min() < 0 or ts.max() >= num_train_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps - 1}], got {ts.tolist()}")
    if np.any(np.diff(ts) >= 0):
        raise ValueError(f"timesteps must be strictly descending, got {ts.tolist()}")
    return ts.astype(np.int32)
