"""Convert a local diffusers folder's PyTorch weights to Flax params once, so later runs skip the conversion.

python experiments/convert.py --model_dir PATH/ddpm-cifar10-32 --out checkpoints/ddpm-cifar10-32-flax

The output folder (configs + diffusion_flax_model.msgpack) loads with `--config.model_dir=OUT` or
`tmpq_jax.models.from_pretrained(OUT)`. Nothing is downloaded: PATH must already be on disk.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax.cpu_flags import apply_cpu_xla_flags  # noqa: E402
apply_cpu_xla_flags()  # before JAX starts: LLVM -O1 on CPU-only machines (tmpq_jax/cpu_flags.py)
from tmpq_jax import models  # noqa: E402
from tmpq_jax.checkpoint import CheckpointError  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    flags.DEFINE_string("model_dir", None, "A downloaded diffusers folder (e.g. google/ddpm-cifar10-32).")
    flags.DEFINE_string("out", None, "Output folder for the converted Flax params and configs.")
    flags.DEFINE_string("family", None, f"Model family (default: detected from the folder); one of "
                        f"{sorted(models.FAMILIES)}.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"convert.py takes no positional arguments, got {argv[1:]}")
    if not FLAGS.model_dir or not FLAGS.out:
        raise app.UsageError("--model_dir and --out are required")
    t0 = time.time()
    try:
        spec = models.convert_folder(FLAGS.model_dir, FLAGS.out, FLAGS.family)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"converted {spec.family} model {spec.name} ({spec.description}) to {FLAGS.out} in "
          f"{time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
