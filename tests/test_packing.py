"""Packed weight codes of the exported file (no model)."""

import numpy as np
import pytest

from tmpq_jax.deploy import codes_per_word, pack_codes, unpack_codes


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(1,), (3, 3, 5, 7), (13, 1), (2, 0), (31,)])
def test_pack_unpack_round_trip_on_odd_shapes(bits, shape):
    rng = np.random.default_rng(bits * 100 + len(shape))
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = rng.integers(lo, hi + 1, shape)
    if codes.size:
        codes.reshape(-1)[0], codes.reshape(-1)[-1] = lo, hi  # both ends of the range
    words = pack_codes(codes, bits)
    assert words.dtype == np.uint32 and len(words) == -(-codes.size // codes_per_word(bits))
    out = unpack_codes(words, bits, shape)
    assert out.dtype == np.int8 and out.shape == shape
    np.testing.assert_array_equal(out, codes)


def test_layout_is_the_documented_one():
    # 6 bits: 5 codes per word, code + 32 in the lowest bits first
    words = pack_codes(np.array([-32, -1, 0, 1, 31, 5]), 6)
    assert words.tolist() == [0 | (31 << 6) | (32 << 12) | (33 << 18) | (63 << 24), 37]
    assert [codes_per_word(b) for b in (8, 7, 6, 5)] == [4, 4, 5, 6]


@pytest.mark.parametrize("call,match", [
    (lambda: pack_codes(np.array([16]), 5), r"code 16 does not fit 5 bits; valid range \[-16, 15\]"),
    (lambda: pack_codes(np.array([-129]), 8), r"code -129 does not fit 8 bits"),
    (lambda: pack_codes(np.array([0.5]), 8), "must be integers"),
    (lambda: pack_codes(np.array([1]), 9), r"bits=9 is invalid; valid: an integer in \[2, 8\]"),
    (lambda: unpack_codes(np.zeros(3, np.uint32), 8, (4, 4)), "3 packed words do not hold a \\(4, 4\\) tensor"),
    (lambda: unpack_codes(np.zeros(4, np.int32), 8, (4, 4)), "1-D uint32"),
])
def test_bad_input_is_a_named_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
@pytest.mark.parametrize("rounding", ["nearest", "learned"])
def test_exported_codes_times_scales_equal_the_simulated_kernel_exactly(bits, rounding):
    """The export's codes and per-channel scales (engine.kernel_codes) are what the search's QDQ multiplies back."""
    import jax.numpy as jnp

    from tmpq_jax.quant.engine import kernel_codes, quantize_kernel

    rng = np.random.default_rng(bits)
    w = jnp.asarray(rng.normal(size=(3, 3, 5, 7)).astype(np.float32))
    clip = jnp.asarray(np.abs(np.asarray(w)).max(axis=(0, 1, 2)) * 0.8)  # clipping on: codes reach +-qmax
    packed = None
    if rounding == "learned":
        packed = jnp.asarray(np.packbits(rng.integers(0, 2, w.size).astype(np.uint8)))
    codes, scale = kernel_codes(w, clip, jnp.int32(bits), packed)
    sim = quantize_kernel(w, clip, jnp.int32(bits), packed)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == jnp.int32 and int(jnp.abs(codes).max()) == qmax
    np.testing.assert_array_equal(np.asarray(codes).astype(np.float32) * np.asarray(scale), np.asarray(sim))
    np.testing.assert_array_equal(unpack_codes(pack_codes(np.asarray(codes), bits), bits, codes.shape), codes)
