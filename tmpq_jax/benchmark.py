"""Helpers shared by the benchmark scripts: median wall time of a jitted call, and where it ran."""

from __future__ import annotations

import platform
import time

import jax
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
