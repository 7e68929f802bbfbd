"""DDPM training objective and the DDIM (eta = 0) sampler over an arbitrary descending list of timesteps.

Notation follows Ho et al. (2020) and Song et al. (2021, "DDIM", eq. 12 with sigma = 0):
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_theta,
with abar_prev = 1 after the last step, so the sampler returns x0_hat of the last step.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


def ddim_step(x: jax.Array, eps: jax.Array, abar_t: jax.Array, abar_prev: jax.Array, clip_x0: bool = True):
    """One deterministic DDIM update (eta = 0). Returns (x_prev, x0_hat)."""
    x0 = (x - jnp.sqrt(1.0 - abar_t) * eps) / jnp.sqrt(abar_t)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1.0 - abar_t)
    return jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev) * eps, x0


class Trajectory(NamedTuple):
    """Per-step UNet inputs of a sampling run: x_t (N, B, H, W, C) and t (N,)."""

    x: jax.Array
    t: jax.Array


def ddim_sample(eps_fn: EpsFn, abar: jax.Array, timesteps: jax.Array, noise: jax.Array, labels: jax.Array,
                clip_x0: bool = True, return_trajectory: bool = False):
    """DDIM (eta = 0) from `noise` over `timesteps` (N,), strictly descending ints in [0, T).

    A pure function of its arrays: jit it, vmap it over a population of timestep lists, or `lax.map` it.
    `timesteps` is traced, so one compiled program serves every list of the same length.
    Returns x_0 in [-1, 1] (and the Trajectory of UNet inputs if asked).
    """
    timesteps = jnp.asarray(timesteps, jnp.int32)
    abar = jnp.asarray(abar, noise.dtype)
    abar_t = abar[timesteps]
    abar_prev = jnp.concatenate([abar_t[1:], jnp.ones((1,), abar.dtype)])

    def body(x, step):
        t, a_t, a_prev = step
        eps = eps_fn(x, jnp.full((x.shape[0],), t, jnp.int32), labels)
        x_prev, x0 = ddim_step(x, eps, a_t, a_prev, clip_x0)
        return x_prev, (x if return_trajectory else None)

    x, xs = jax.lax.scan(body, noise, (timesteps, abar_t, abar_prev))
    x = jnp.clip(x, -1.0, 1.0)
    return (x, Trajectory(xs, timesteps)) if return_trajectory else x


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
