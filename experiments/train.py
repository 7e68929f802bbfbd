"""Train a diffusion UNet: python experiments/train.py --config experiments/configs/train_default.py --workdir DIR."""

from absl import app, flags
from ml_collections import config_flags

from tmpq_jax.training import train

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    config_flags.DEFINE_config_file("config", "experiments/configs/train_default.py", "Training config file.")
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, EMA params and samples.", required=True)
    flags.DEFINE_bool("resume", False, "Continue from DIR/train_state.msgpack if it exists.")


def main(argv):
    del argv
    summary = train(FLAGS.config, FLAGS.workdir, resume=FLAGS.resume)
    print(f"done: {summary['steps']} steps, EMA params in {FLAGS.workdir}/ema_params.msgpack")


if __name__ == "__main__":
    define_flags()
    app.run(main)
