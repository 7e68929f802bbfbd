"""Noise and labels drawn for one purpose (DESIGN.md Sec. 5): the search, its top-k selection and every report each
get their own samples, and anything that generates for a report (`experiments/evaluate.py`,
`experiments/generate.py`) draws the same rows from the same seed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PURPOSES = {"fitness": 1, "select": 2, "report": 3}


def purpose_noise(seed: int, purpose: str, n: int, sample_shape: tuple[int, ...], num_classes: int):
    """Noise and labels for one purpose: key = fold_in(key(seed), PURPOSES[purpose]); labels cycle over classes
    (prompts, for text models)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown noise purpose {purpose!r}; valid: {sorted(PURPOSES)}")
    key = jax.random.fold_in(jax.random.key(seed), PURPOSES[purpose])
    noise = jax.random.normal(key, (n, *sample_shape), jnp.float32)
    labels = jnp.arange(n) % num_classes if num_classes else jnp.full((n,), 0)
    return noise, labels.astype(jnp.int32)


def fixed_batches(n: int, batch: int):
    """Row indices of n rows in batches of one size, min(batch, n): the last batch repeats its last row to fill, so
    that a jitted sampler compiles once for every n (on a CPU one compile of a quantized sampler costs as much as
    about 2,500 UNet evaluations of mnist-small). Yields (indices (numpy int), number of real rows)."""
    if batch < 1 or n < 0:
        raise ValueError(f"fixed_batches(n={n}, batch={batch}) is invalid; valid: n >= 0, batch >= 1")
    size = min(batch, n)
    for start in range(0, n, size) if n else ():
        yield np.minimum(np.arange(start, start + size), n - 1), min(size, n - start)
