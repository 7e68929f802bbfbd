"""Throughput of FID feature extraction (preprocess + Flax FID Inception-v3), img/s per input size and batch.

python experiments/bench_fid.py --out benchmarks/fid_features_cpu.json [--batches 16,50] [--sizes 28x1,32x3]

Each row times one jitted call on a full batch (median of --repeats after a compiling call) with random images.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from tmpq_jax.benchmark import environment, timed
from tmpq_jax.metrics import fid
from tmpq_jax.metrics.inception import INPUT_SIZE, InceptionV3FID

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    flags.DEFINE_string("out", "benchmarks/fid_features.json", "Output JSON.")
    flags.DEFINE_list("batches", ["16", "50"], "Batch sizes.")
    flags.DEFINE_list("sizes", ["28x1", "32x3"], "Input sizes as SIZExCHANNELS (square images).")
    flags.DEFINE_list("precisions", ["highest"], "Conv precisions ('default' may use TF32/bf16 on accelerators).")
    flags.DEFINE_integer("repeats", 3, "Timed calls per case (median reported).")
    flags.DEFINE_string("cache_dir", None, "Weights cache (default $TMPQ_CACHE or ~/.cache/tmpq_jax).")
    flags.DEFINE_bool("random_weights", False, "Random weights of the same shapes (same cost), for machines without "
                      "the converted weights, e.g. a lent GPU that cannot fetch them.")


def main(argv):
    del argv
    if FLAGS.random_weights:
        params = jax.jit(lambda k: InceptionV3FID().init(k, jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"])(
            jax.random.key(0))
        extractor = fid.InceptionFeatures(params)
    else:
        extractor = fid.InceptionFeatures.load(FLAGS.cache_dir)
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'input':>8s} {'batch':>6s} {'precision':>9s} {'img/s':>8s} {'compile s':>9s}")
    for size in FLAGS.sizes:
        s, c = (int(v) for v in size.split("x"))
        for batch in map(int, FLAGS.batches):
            images = np.random.default_rng(0).uniform(0, 1, (batch, s, s, c)).astype(np.float32)
            for precision in FLAGS.precisions:
                def call(x, precision=precision):
                    return fid._features(extractor.params, x, extractor.quantize, precision)

                sec, compile_s = timed(call, images, repeats=FLAGS.repeats)
                rows.append({"input": [s, s, c], "batch": batch, "precision": precision, "img_per_s": batch / sec,
                             "seconds": sec, "compile_seconds": compile_s})
                print(f"{size:>8s} {batch:6d} {precision:>9s} {batch / sec:8.1f} {compile_s:9.1f}", flush=True)
                out.write_text(json.dumps({**environment(), "random_weights": FLAGS.random_weights, "rows": rows},
                                          indent=2) + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
