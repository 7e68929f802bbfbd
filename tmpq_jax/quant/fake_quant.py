"""Quantize-dequantize (QDQ) with the bit-width as a traced integer array.

One compiled program serves every bit-width: `bits` is data, so it can be vmapped over a population.
Rounding uses a straight-through estimator, so QDQ is differentiable. Bit-widths >= 16 pass through exactly.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS, MAX_BITS = 2, 16
PASSTHROUGH_BITS = 16


def check_bits(bits, name: str = "bits", length: int | None = None) -> np.ndarray:
    """Validate concrete bit-widths: ints in [2, 16], and the expected vector length."""
    arr = np.asarray(bits)
    if not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))):
            raise ValueError(f"{name} must be integers in [{MIN_BITS}, {MAX_BITS}], got {arr.tolist()}")
    bad = arr[(arr < MIN_BITS) | (arr > MAX_BITS)]
    if bad.size:
        raise ValueError(f"{name} has bit-widths {sorted(set(bad.tolist()))} outside the valid range "
                         f"[{MIN_BITS}, {MAX_BITS}]")
    if length is not None and arr.shape != (length,):
        raise ValueError(f"{name} must be a vector of length {length} (one per site), got shape {arr.shape}")
    return arr.astype(np.int32)


def check_bit_choices(choices: Sequence[int], name: str = "bit_choices") -> np.ndarray:
    arr = check_bits(choices, name)
    if arr.ndim != 1 or arr.size == 0 or len(set(arr.tolist())) != arr.size:
        raise ValueError(f"{name} must be a non-empty list of distinct bit-widths, got {np.asarray(choices).tolist()}")
    return arr


def _ste_round(x):
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def symmetric_codes(x: jax.Array, clip: jax.Array, bits: jax.Array, up: jax.Array | None = None):
    """(codes, scale) of the symmetric signed quantizer: codes in {-qmax..qmax} (floats holding integers),
    scale = clip / qmax, qmax = 2^(b-1) - 1; codes = round(x / scale) (straight-through), or floor(x / scale) + up
    with a given rounding `up` in [0, 1] (AdaRound's h(V), Nagel et al. 2020, eq. 22). `clip` broadcasts against x
    (per output channel for weights). Simulation (`qdq_symmetric*`) and export share this function."""
    bits = jnp.asarray(bits)
    qmax = jnp.exp2(bits.astype(x.dtype) - 1.0) - 1.0
    scale = jnp.maximum(jnp.asarray(clip, x.dtype), jnp.finfo(x.dtype).tiny) / qmax
    r = _ste_round(x / scale) if up is None else jnp.floor(x / scale) + up.astype(x.dtype)
    return jnp.clip(r, -qmax, qmax), scale


def qdq_symmetric(x: jax.Array, clip: jax.Array, bits: jax.Array) -> jax.Array:
    """Symmetric signed QDQ on the grid scale * {-qmax..qmax} (`symmetric_codes`); 16 bits pass through."""
    codes, scale = symmetric_codes(x, clip, bits)
    return jnp.where(jnp.asarray(bits) >= PASSTHROUGH_BITS, x, codes * scale)


def qdq_symmetric_rounded(x: jax.Array, clip: jax.Array, bits: jax.Array, up: jax.Array) -> jax.Array:
    """`qdq_symmetric` with a given rounding `up` (learned, {0, 1} once learned)."""
    codes, scale = symmetric_codes(x, clip, bits, up)
    return jnp.where(jnp.asarray(bits) >= PASSTHROUGH_BITS, x, codes * scale)


def asymmetric_params(lo: jax.Array, hi: jax.Array, bits: jax.Array, dtype=jnp.float32):
    """(scale, zero_point, levels) of the asymmetric unsigned quantizer of a static range [lo, hi]:
    lo' = min(lo, 0), hi' = max(hi, 0) (0 stays exact), levels = 2^b - 1, scale = max(hi' - lo', eps) / levels,
    zero_point = round(-lo' / scale) in [0, levels] (round half to even). Simulation and export share it."""
    bits = jnp.asarray(bits)
    levels = jnp.exp2(bits.astype(dtype)) - 1.0
    lo = jnp.minimum(jnp.asarray(lo, dtype), 0.0)
    hi = jnp.maximum(jnp.asarray(hi, dtype), 0.0)
    scale = jnp.maximum(hi - lo, jnp.finfo(dtype).eps) / levels
    return scale, jnp.round(-lo / scale), levels


def asymmetric_codes(x: jax.Array, scale: jax.Array, zero_point: jax.Array, levels: jax.Array) -> jax.Array:
    """Unsigned codes q = clip(round(x / scale) + zero_point, 0, levels) (floats holding integers; the rounding is
    straight-through); x is represented as (q - zero_point) * scale."""
    return jnp.clip(_ste_round(x / scale) + zero_point, 0.0, levels)


def qdq_asymmetric(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: jax.Array) -> jax.Array:
    """Asymmetric unsigned QDQ of a tensor with a static range [lo, hi] (`asymmetric_params`); 16 bits pass
    through."""
    scale, zero_point, levels = asymmetric_params(lo, hi, bits, x.dtype)
    q = asymmetric_codes(x, scale, zero_point, levels)
    return jnp.where(jnp.asarray(bits) >= PASSTHROUGH_BITS, x, (q - zero_point) * scale)
