"""Helpers shared by the benchmark scripts: median wall time of a jitted call, where it ran, and one writer per
output JSON."""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import time
from pathlib import Path

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
            "jax": jax.__version__, "flax": flax.__version__, "host": platform.node(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def machine() -> str:
    """One line for a benchmark JSON: architecture, cores, device and XLA_FLAGS (numbers depend on all four)."""
    return (f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind}, "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


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


@contextlib.contextmanager
def sole_writer(out_path):
    """Hold an exclusive lock on `<out>.lock` while a script reads, extends and rewrites its output JSON: a second
    process on the same `--out` would write back a stale copy and lose the first one's rows, so it is refused at
    once, naming the holder. The OS drops the lock when the holder exits, however it exits."""
    lock_path = Path(str(out_path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RuntimeError(f"{out_path} is being written by {holder} (lock {lock_path}); wait for it to end or "
                               f"pass another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}".encode(), 0)
        yield
    finally:
        os.close(fd)
