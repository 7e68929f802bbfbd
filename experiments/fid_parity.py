"""Parity of the Flax FID Inception with the TorchScript original (needs torch), the numbers the README states.

python experiments/fid_parity.py --out benchmarks/fid_parity_cpu.json

Random images through the whole pipeline both ways: relative L2 error of the (4, 2048) features at 28x28x1,
32x32x3 and 299x299x3, and the FID between two sets of 12 images at 28x28x1 computed from our features and
statistics vs from the torch features with numpy float64 covariances and the `scipy.linalg.sqrtm` formula.
tests/test_fid.py asserts the same quantities (and uses `torch_features` from here).
"""

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax.cpu_flags import apply_cpu_xla_flags  # noqa: E402
apply_cpu_xla_flags()  # before JAX starts: LLVM -O1 on CPU-only machines (tmpq_jax/cpu_flags.py)
from tmpq_jax.benchmark import environment  # noqa: E402
from tmpq_jax.metrics import fid  # noqa: E402
from tmpq_jax.metrics import inception_weights as W  # noqa: E402

SIZES = [(28, 1), (32, 3), (299, 3)]


def random_images(seed, n, size, channels):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, channels)).astype(np.float32)


def torch_features(path, images01):
    """The reference pipeline in torch: 8-bit levels, TF-1 bilinear resize via grid_sample, (x - 128) / 128."""
    import torch

    net = torch.jit.load(str(path), map_location="cpu").eval()
    x = torch.from_numpy(np.round(images01 * 255.0).transpose(0, 3, 1, 2).copy()).expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    # output pixel j samples input position j * in / out; grid_sample (align_corners=False) reads pixel u at
    # normalised coordinate (2u + 1) / in - 1, and 'border' padding clamps at the last pixel
    ys = (2 * (torch.arange(299, dtype=torch.float64) * h / 299) + 1) / h - 1
    xs = (2 * (torch.arange(299, dtype=torch.float64) * w / 299) + 1) / w - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).float()[None].expand(n, -1, -1, -1)
    x = torch.nn.functional.grid_sample(x.contiguous(), grid, mode="bilinear", padding_mode="border",
                                        align_corners=False)
    with torch.no_grad():
        return net(x / 128.0 - 1.0).double().numpy()


def feature_error(extractor, source, size, channels) -> float:
    """Relative L2 error of our features of 4 random images (seed = size) against the TorchScript network's."""
    images = random_images(size, 4, size, channels)
    ref = torch_features(source, images)
    ours = extractor.features(images, progress=False).astype(np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def fid_pair(extractor, source) -> tuple[float, float]:
    """(ours, reference) FID between 12 uniform and 12 squared-uniform 28x28x1 images."""
    import scipy.linalg

    a, b = random_images(1, 12, 28, 1), random_images(2, 12, 28, 1) ** 2
    fa, fb = (torch_features(source, x) for x in (a, b))
    (mu1, s1), (mu2, s2) = [(f.mean(0), np.cov(f, rowvar=False)) for f in (fa, fb)]
    with warnings.catch_warnings():  # n = 12 < 2048: S1 S2 is singular, which sqrtm warns about
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))
    ours = fid.fid_from_stats(extractor.stats(a, progress=False), extractor.stats(b, progress=False))
    return float(ours), expected


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/fid_parity_cpu.json")
    parser.add_argument("--cache_dir", default=None, help="weights cache (default $TMPQ_CACHE or ~/.cache/tmpq_jax)")
    args = parser.parse_args()
    import torch

    cache = W.cache_dir(args.cache_dir)
    W.fetch_weights(cache=cache)
    extractor = fid.InceptionFeatures.load(cache, batch_size=4)
    rows = []
    for size, channels in SIZES:
        err = feature_error(extractor, cache / W.SOURCE_FILE, size, channels)
        rows.append({"input": [size, size, channels], "n": 4, "relative_feature_error": err})
        print(f"relative feature error at {size}x{size}x{channels}: {err:.2e}", flush=True)
    ours, expected = fid_pair(extractor, cache / W.SOURCE_FILE)
    print(f"FID ours {ours:.6f} numpy/torch reference {expected:.6f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        **environment(), "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
        "features": rows,
        "fid_12_vs_12": {"ours": ours, "reference": expected, "relative_difference": abs(ours - expected) / expected,
                         "reference_method": "torch features, numpy float64 covariances, scipy.linalg.sqrtm"},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
