"""Integer execution of a Conv/Dense site: activations quantized into int8 containers, int8 x int8 products
accumulated in int32, and one float rescale per output channel.

With the asymmetric activation quantizer x = (q - z) s_a (q in [0, 2^b - 1]) and symmetric weights w = c s_w, store
q - o in int8 with o = 2^(b-1) (fits for b <= 8). Then for each output

    y = s_a s_w [ sum (q - o) c + (o - z) sum c ] + bias,

where the second sum runs over the whole kernel window. A padded input position must stand for x = 0, i.e. q = z,
so the int8 input is padded with z - o explicitly and the convolution itself runs unpadded ('VALID').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding

from tmpq_jax.quant.fake_quant import asymmetric_codes, asymmetric_params


def int8_activation(x: jax.Array, lo, hi, bits: int):
    """(q - o as int8, o - z as int32, scale) of x under the static range [lo, hi] at `bits` <= 8 bits; q is the
    simulation's own code (`asymmetric_codes`), so the integers are the simulated ones exactly."""
    if not 2 <= bits <= 8:
        raise ValueError(f"int8 activations need 2..8 bits, got {bits}")
    scale, zero_point, levels = asymmetric_params(lo, hi, jnp.int32(bits), x.dtype)
    offset = float(1 << (bits - 1))
    q = asymmetric_codes(x, scale, zero_point, levels)
    return (q - offset).astype(jnp.int8), (offset - zero_point).astype(jnp.int32), scale


def dense_accumulator(q: jax.Array, codes: jax.Array, shift: jax.Array) -> jax.Array:
    """int32 sum_k (q + shift) codes over the last axis of q (..., K) and codes (K, O)."""
    acc = jax.lax.dot_general(q, codes, (((q.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return acc + shift * jnp.sum(codes.astype(jnp.int32), axis=0)


def conv_pads(module, x_shape, kernel_shape) -> list[tuple[int, int]] | None:
    """Explicit (low, high) padding of an `nn.Conv` call, or None if it is not a zero padding ('CIRCULAR',
    'CAUSAL')."""
    rank = len(kernel_shape) - 2
    padding = canonicalize_padding(module.padding, rank)
    if isinstance(padding, str):
        if padding == "VALID":
            return [(0, 0)] * rank
        if padding != "SAME":
            return None
        dil = _tuple(module.kernel_dilation, rank)
        window = [(k - 1) * d + 1 for k, d in zip(kernel_shape[:rank], dil)]
        return list(jax.lax.padtype_to_pads(x_shape[1:-1], window, _tuple(module.strides, rank), "SAME"))
    return [tuple(int(v) for v in p) for p in padding]


def _tuple(v, n) -> tuple[int, ...]:
    if v is None:
        return (1,) * n
    return (int(v),) * n if isinstance(v, (int, np.integer)) else tuple(int(x) for x in v)


def conv_accumulator(q: jax.Array, codes: jax.Array, shift: jax.Array, pads, strides, kernel_dilation,
                     groups: int = 1) -> jax.Array:
    """int32 sum over each window of (q + shift) codes, with q (B, *spatial, C) int8 padded by -shift (so that a
    padded position counts as 0), codes (*k, C / groups, O) int8, NHWC."""
    pad_value = (-shift).astype(jnp.int8)
    qp = jnp.pad(q, [(0, 0), *pads, (0, 0)], constant_values=pad_value)
    rank = codes.ndim - 2
    spatial = "".join("DHW"[-rank:]) if rank <= 3 else None
    dn = jax.lax.conv_dimension_numbers(qp.shape, codes.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    acc = jax.lax.conv_general_dilated(qp, codes, strides, "VALID", rhs_dilation=kernel_dilation,
                                       dimension_numbers=dn, feature_group_count=groups,
                                       preferred_element_type=jnp.int32)
    return acc + shift * jnp.sum(codes.astype(jnp.int32), axis=tuple(range(codes.ndim - 1)))


def conv_unsupported(module) -> str | None:
    """Why an `nn.Conv` cannot run on the integer path here (None: it can)."""
    if any(d != 1 for d in _tuple(module.input_dilation, len(module.kernel_size))):
        return "input dilation (a transposed convolution) inserts zeros the zero-point correction does not cover"
    padding = canonicalize_padding(module.padding, len(module.kernel_size))
    if isinstance(padding, str) and padding not in ("SAME", "VALID"):
        return f"padding {module.padding!r} is not a zero padding"
    if getattr(module, "mask", None) is not None:
        return "masked kernel"
    return None
