"""Helpers shared by the benchmark scripts: median wall time of a jitted call, and where it ran."""

from __future__ import annotations

import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(median seconds of `repeats` calls after a first, compiling call; seconds of that first call)."""
    t0 = time.time()
    jax.block_until_ready(fn(*args))
    compile_s = time.time() - t0
    times = []
    for _ in range(repeats):
        t0 = time.time()
        jax.block_until_ready(fn(*args))
        times.append(time.time() - t0)
    return float(np.median(times)), compile_s


def environment() -> dict:
    """Device, platform and library versions, recorded next to every benchmark number."""
    import flax

    d = jax.devices()[0]
    return {"device": d.device_kind, "platform": d.platform, "device_count": jax.device_count(),
            "jax": jax.__version__, "flax": flax.__version__, "host": platform.node()}


def random_params(shapes, key, dtype):
    """N(0, 1/fan_in) kernels, zero biases, unit norm scales: enough for timing, never an init of the model."""
    leaves, tree = jax.tree.flatten_with_path(shapes)
    out = []
    for i, (path, s) in enumerate(leaves):
        name = str(path[-1])
        if "scale" in name:
            out.append(jnp.ones(s.shape, dtype))
        elif "bias" in name or len(s.shape) < 2:
            out.append(jnp.zeros(s.shape, dtype))
        else:
            fan_in = max(1, int(np.prod(s.shape[:-1])))
            out.append((jax.random.normal(jax.random.fold_in(key, i), s.shape, jnp.float32) / np.sqrt(fan_in))
                       .astype(dtype))
    return jax.tree.unflatten(tree, out)
