"""The integer path of the runtime against an int64 numpy reference, exactly (no model)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.deploy import integer
from tmpq_jax.quant.fake_quant import asymmetric_params, qdq_asymmetric


def numpy_conv_int64(xq, codes, pads, strides, dilation):
    """sum over each window of xq * codes in int64, zero-padded: xq (B, H, W, C), codes (kh, kw, C, O)."""
    xq = np.pad(xq.astype(np.int64), [(0, 0), *pads, (0, 0)])
    kh, kw, _, o = codes.shape
    (sh, sw), (dh, dw) = strides, dilation
    ho = (xq.shape[1] - (kh - 1) * dh - 1) // sh + 1
    wo = (xq.shape[2] - (kw - 1) * dw - 1) // sw + 1
    out = np.zeros((xq.shape[0], ho, wo, o), np.int64)
    for i in range(ho):
        for j in range(wo):
            win = xq[:, i * sh:i * sh + (kh - 1) * dh + 1:dh, j * sw:j * sw + (kw - 1) * dw + 1:dw, :]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", win, codes.astype(np.int64))
    return out


def activation_case(bits, seed, shape, lo=-1.3, hi=2.1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32) * 1.5)
    q, shift, scale = integer.int8_activation(x, jnp.float32(lo), jnp.float32(hi), bits)
    s, zp, levels = asymmetric_params(jnp.float32(lo), jnp.float32(hi), jnp.int32(bits))
    xq = np.rint(np.clip(np.round(np.asarray(x) / float(s)) + float(zp), 0, float(levels))).astype(np.int64) - int(zp)
    return x, q, shift, scale, xq


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_int8_activation_codes_are_the_simulated_ones(bits):
    x, q, shift, scale, xq = activation_case(bits, bits, (2, 5, 5, 3))
    assert q.dtype == jnp.int8 and shift.dtype == jnp.int32
    lo_q, hi_q = int(jnp.min(q)), int(jnp.max(q))
    assert -(1 << (bits - 1)) <= lo_q and hi_q <= (1 << (bits - 1)) - 1 and hi_q - lo_q == (1 << bits) - 1  # clipped
    np.testing.assert_array_equal(np.asarray(q, np.int64) + int(shift), xq)
    # (q + shift) * scale is the simulation's fake-quantized activation
    sim = qdq_asymmetric(x, jnp.float32(-1.3), jnp.float32(2.1), jnp.int32(bits))
    np.testing.assert_array_equal((np.asarray(q, np.float32) + float(shift)) * float(scale), np.asarray(sim))


@pytest.mark.parametrize("bits, pads, strides, dilation", [
    (8, ((1, 1), (1, 1)), (1, 1), (1, 1)),
    (8, ((0, 1), (0, 1)), (2, 2), (1, 1)),  # the diffusers downsample (pad right/bottom, stride 2)
    (6, ((0, 0), (0, 0)), (1, 1), (1, 1)),
    (5, ((2, 2), (2, 2)), (1, 1), (2, 2)),
    (7, ((1, 2), (0, 1)), (1, 2), (1, 1)),
])
def test_conv_accumulator_equals_int64_reference(bits, pads, strides, dilation):
    x, q, shift, _, xq = activation_case(bits, 3, (2, 7, 6, 4))
    codes = np.random.default_rng(4).integers(-127, 128, (3, 3, 4, 5)).astype(np.int8)
    acc = integer.conv_accumulator(q, jnp.asarray(codes), shift, list(pads), strides, dilation)
    assert acc.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc, np.int64), numpy_conv_int64(xq, codes, pads, strides, dilation))


def test_dense_accumulator_equals_int64_reference():
    x, q, shift, _, xq = activation_case(8, 5, (3, 4, 9))
    codes = np.random.default_rng(6).integers(-127, 128, (9, 6)).astype(np.int8)
    acc = integer.dense_accumulator(q, jnp.asarray(codes), shift)
    assert acc.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc, np.int64), xq @ codes.astype(np.int64))


@pytest.mark.parametrize("padding, want", [
    ("SAME", [(1, 1), (1, 1)]), ("VALID", [(0, 0), (0, 0)]), (((0, 1), (0, 1)), [(0, 1), (0, 1)]), (2, [(2, 2), (2, 2)]),
])
def test_conv_pads_follow_flax(padding, want):
    conv = nn.Conv(4, (3, 3), padding=padding)
    assert integer.conv_pads(conv, (1, 8, 8, 2), (3, 3, 2, 4)) == want
    # and the padded VALID convolution has the shape flax's own call gives
    x = jnp.ones((1, 8, 8, 2))
    y = conv.apply(conv.init(jax.random.key(0), x), x)
    acc = integer.conv_accumulator(jnp.ones((1, 8, 8, 2), jnp.int8), jnp.ones((3, 3, 2, 4), jnp.int8),
                                   jnp.int32(0), want, (1, 1), (1, 1))
    assert acc.shape == y.shape


def test_unsupported_convs_are_named():
    assert "transposed" in integer.conv_unsupported(nn.Conv(4, (3, 3), input_dilation=2))
    assert "not a zero padding" in integer.conv_unsupported(nn.Conv(4, (3, 3), padding="CIRCULAR"))
    assert integer.conv_unsupported(nn.Conv(4, (3, 3))) is None
    with pytest.raises(ValueError, match="2..8 bits, got 16"):
        integer.int8_activation(jnp.zeros(3), 0.0, 1.0, 16)
