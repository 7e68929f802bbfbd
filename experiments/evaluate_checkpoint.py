"""Measure a UNet checkpoint's sample quality with the project classifier and write it into the card.

python experiments/evaluate_checkpoint.py --checkpoint checkpoints/mnist-small/ema_params.msgpack \
    --card checkpoints/mnist-small/card.json
"""

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from tmpq_jax import checkpoint, data, diffusion, metrics, models
from tmpq_jax.visual import save_grid

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so that tests can import this module next to
    other experiments that define the same flag names)."""
    flags.DEFINE_string("checkpoint", "checkpoints/mnist-small/ema_params.msgpack", "EMA params file.")
    flags.DEFINE_string("model", "mnist-small", "Model config name.")
    flags.DEFINE_string("card", "checkpoints/mnist-small/card.json", "JSON card to update (created if missing).")
    flags.DEFINE_integer("num_samples", 1000, "Samples to generate (labels cycle 0..9).")
    flags.DEFINE_integer("steps", 100, "DDIM steps (uniform schedule).")
    flags.DEFINE_integer("batch", 250, "Sampling batch size.")
    flags.DEFINE_integer("seed", 1234, "Noise seed.")


def main(argv):
    del argv
    spec = models.get_spec(FLAGS.model)
    model = models.build_model(spec)
    params = checkpoint.load_params(FLAGS.checkpoint, spec)
    abar = jnp.asarray(diffusion.alphas_cumprod(), jnp.float32)
    ts = diffusion.uniform_timesteps(FLAGS.steps)
    sample = jax.jit(lambda p, noise, y: diffusion.ddim_sample(
        lambda x, t, yy: model.apply({"params": p}, x, t, yy), abar, ts, noise, y))
    labels = np.arange(FLAGS.num_samples) % 10
    noise = jax.random.normal(jax.random.key(FLAGS.seed), (FLAGS.num_samples, *spec.sample_shape))
    t0, outs = time.time(), []
    for i in range(0, FLAGS.num_samples, FLAGS.batch):
        outs.append(np.asarray(sample(params, noise[i:i + FLAGS.batch], jnp.asarray(labels[i:i + FLAGS.batch]))))
        print(f"sampled {i + len(outs[-1])}/{FLAGS.num_samples} ({time.time() - t0:.0f} s)", flush=True)
    images = np.concatenate(outs)
    clf = metrics.ClassifierFeatures.load()
    _, f_train = clf.batched(data.mnist("train").images)
    _, f_held = clf.batched(data.mnist("heldout").images)
    mu_h, sig_h = metrics.feature_stats(f_held)
    report = metrics.classifier_report(clf, images, mu_h, sig_h, labels)
    report["real_vs_real_frechet_distance"] = metrics.frechet_distance(*metrics.feature_stats(f_train), mu_h, sig_h)
    report.update(ddim_steps=FLAGS.steps, schedule="uniform", noise_seed=FLAGS.seed,
                  sampling_seconds=round(time.time() - t0, 1), sampling_device=jax.devices()[0].device_kind,
                  reference="held-out 500 MNIST digits; features: 128-d penultimate layer of checkpoints/mnist-classifier",
                  command=f"python experiments/evaluate_checkpoint.py --checkpoint {FLAGS.checkpoint} --model "
                          f"{FLAGS.model} --num_samples {FLAGS.num_samples} --steps {FLAGS.steps} --seed {FLAGS.seed}")
    card_path = Path(FLAGS.card)
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    card["quality"] = report
    checkpoint.write_json(card_path, card)
    save_grid(card_path.parent / "samples.png", data.to_unit_range(images[:100]), ncols=10)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    define_flags()
    app.run(main)
