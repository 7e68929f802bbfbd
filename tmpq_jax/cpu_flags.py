"""XLA flags for CPU-only machines, set before JAX starts its backends.

XLA compiles CPU kernels with LLVM at -O3 by default. On the 2-core reference machine -O1
(`--xla_backend_optimization_level=1`) sampled the 10-step quantized mnist-small UNet at 146-166 img-steps/s against
126-143 and compiled it in 13-15 s against 14-20 s; Inception features were bit-identical and as fast; the default
search took 0.94x its -O3 time (README "Results on the embedded default"); -O0 sampled 4x slower. Another level
rounds differently (quantized samples differ by rounding flips), so caches and fingerprints record the level.
Accelerators keep XLA's default: the flag also sets the LLVM level of GPU kernels.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil

CPU_OPT_FLAG = "--xla_backend_optimization_level"
CPU_OPT_LEVEL = 1
ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")  # and any module of jax_plugins


def accelerator_installed(environ=os.environ) -> bool:
    """Whether JAX may start a non-CPU backend: JAX_PLATFORMS names one, or (unset) a PJRT plugin is installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
    if any(importlib.util.find_spec(m) is not None for m in ACCELERATOR_MODULES):
        return True
    if list(importlib.metadata.entry_points(group="jax_plugins")):
        return True
    try:
        import jax_plugins  # noqa: F401  (namespace package of PJRT plugins)
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def backend_opt_level(environ=os.environ) -> str:
    """The LLVM level XLA_FLAGS sets ('default' if none): part of every cache key and resume fingerprint, since
    quantized samples round differently at another level."""
    level = "default"
    for token in environ.get("XLA_FLAGS", "").split():
        if token.startswith(CPU_OPT_FLAG + "="):
            level = token.split("=", 1)[1]
    return level


def cpu_xla_flags(xla_flags: str, accelerator: bool) -> str:
    """XLA_FLAGS with the CPU optimisation level added, unless an accelerator may run or the user set a level."""
    if accelerator or CPU_OPT_FLAG in xla_flags:
        return xla_flags
    return f"{xla_flags} {CPU_OPT_FLAG}={CPU_OPT_LEVEL}".strip()


def apply_cpu_xla_flags(environ=os.environ) -> str:
    """Set XLA_FLAGS for a CPU-only run (see the module docstring); call before the first JAX computation.

    Returns the XLA_FLAGS in effect. Raises if JAX's backends already started (the flag would be ignored).
    """
    flags = cpu_xla_flags(environ.get("XLA_FLAGS", ""), accelerator_installed(environ))
    if flags != environ.get("XLA_FLAGS", ""):
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise RuntimeError(f"apply_cpu_xla_flags: JAX's backends already started, so XLA_FLAGS={flags!r} would "
                               "be ignored; call it before the first JAX computation")
        environ["XLA_FLAGS"] = flags
    return flags
