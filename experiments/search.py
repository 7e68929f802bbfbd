"""Joint timestep and mixed-precision search (TMPQ-DM).

python experiments/search.py --config experiments/configs/default.py --workdir runs/default [--resume]
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax.cpu_flags import apply_cpu_xla_flags  # noqa: E402
apply_cpu_xla_flags()  # before JAX starts: LLVM -O1 on CPU-only machines (tmpq_jax/cpu_flags.py)
from tmpq_jax.search.run import run_search  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "configs", "default.py"),
                                    "Search config file.")
    flags.DEFINE_string("workdir", "runs/default", "Output directory (results.json, samples, plots, checkpoints).")
    flags.DEFINE_bool("resume", False, "Continue an interrupted search from its per-generation checkpoints.")


def main(argv):
    del argv
    run_search(FLAGS.config, FLAGS.workdir, resume=FLAGS.resume)


if __name__ == "__main__":
    define_flags()
    app.run(main)
