"""Train the MNIST feature classifier used by the default metric.

python experiments/train_classifier.py --workdir checkpoints/mnist-classifier
"""

import json
import platform
import time
from pathlib import Path

import jax
from absl import app, flags

from tmpq_jax import checkpoint, data
from tmpq_jax.models.classifier import train_classifier

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    flags.DEFINE_string("workdir", "checkpoints/mnist-classifier", "Where params.msgpack and card.json go.")
    flags.DEFINE_integer("epochs", 20, "Training epochs over the 4500 training digits.")
    flags.DEFINE_integer("seed", 0, "Random seed.")


def main(argv):
    del argv
    train, held = data.mnist("train"), data.mnist("heldout")
    t0 = time.time()
    params, accs = train_classifier(train.images, train.labels, held.images, held.labels, FLAGS.epochs,
                                    seed=FLAGS.seed)
    out = Path(FLAGS.workdir)
    sha = checkpoint.save_tree(out / "params.msgpack", params)
    card = {"what": "MNIST CNN whose 128-d penultimate layer is the default metric's feature space",
            "command": f"python experiments/train_classifier.py --workdir {FLAGS.workdir} --epochs {FLAGS.epochs} "
                       f"--seed {FLAGS.seed}",
            "train_images": len(train), "heldout_images": len(held), "epochs": FLAGS.epochs,
            "heldout_accuracy": accs[-1], "heldout_accuracy_per_epoch": accs, "seconds": round(time.time() - t0, 1),
            "device": jax.devices()[0].device_kind, "platform": platform.platform(), "jax": jax.__version__,
            "params_sha256": sha}
    checkpoint.write_json(out / "card.json", card)
    print(f"held-out accuracy {accs[-1]:.4f}; wrote {out}/params.msgpack")


if __name__ == "__main__":
    define_flags()
    app.run(main)
