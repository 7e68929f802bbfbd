"""Packing of b-bit signed weight codes into uint32 words, for the exported file.

A code c in [-2^(b-1), 2^(b-1) - 1] is stored as c + 2^(b-1) in b bits. Codes do not straddle words: a word holds
floor(32 / b) codes (8 bits: 4, 7: 4, 6: 5, 5: 6), the first code in the lowest bits, in C order of the flattened
array; the last word is padded with zero bits. Another implementation reads a tensor back from (words, bits, shape)
alone.
"""

from __future__ import annotations

import numpy as np

MIN_BITS, MAX_BITS = 2, 8


def codes_per_word(bits: int) -> int:
    if not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} is invalid; valid: an integer in [{MIN_BITS}, {MAX_BITS}]")
    return 32 // int(bits)


def pack_codes(codes, bits: int) -> np.ndarray:
    """uint32 words (ceil(size / codes_per_word(bits)),) holding the signed integer codes."""
    per = codes_per_word(bits)
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    flat = codes.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < lo or flat.max() > hi):
        bad = flat[(flat < lo) | (flat > hi)][0]
        raise ValueError(f"code {int(bad)} does not fit {bits} bits; valid range [{lo}, {hi}]")
    n_words = -(-flat.size // per)
    u = np.zeros(n_words * per, np.uint64)
    u[: flat.size] = (flat - lo).astype(np.uint64)
    shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))[None, :]
    return np.bitwise_or.reduce(u.reshape(n_words, per) << shifts, axis=1).astype(np.uint32)


def unpack_codes(words, bits: int, shape) -> np.ndarray:
    """int8 codes of `shape` from `pack_codes`' words; a word count that does not match the shape is an error."""
    per = codes_per_word(bits)
    words = np.asarray(words)
    if words.dtype != np.uint32 or words.ndim != 1:
        raise ValueError(f"packed codes must be a 1-D uint32 array, got {words.dtype} of shape {words.shape}")
    size = int(np.prod(shape, dtype=np.int64))
    if len(words) != -(-size // per):
        raise ValueError(f"{len(words)} packed words do not hold a {tuple(shape)} tensor at {bits} bits "
                         f"(needs {-(-size // per)})")
    shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))[None, :]
    u = (words.astype(np.uint64)[:, None] >> shifts) & np.uint64((1 << bits) - 1)
    codes = u.reshape(-1)[:size].astype(np.int64) - (1 << (bits - 1))
    return codes.astype(np.int8).reshape(shape)
