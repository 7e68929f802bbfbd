"""Generate images from a quantized checkpoint written by experiments/export.py, without the search.

python experiments/generate.py --model runs/default/export_best --num_samples 64 --noise_seed 7 \
    --out samples.npz --grid samples.png [--mode dequant|int] [--labels 3,5] [--prompts FILE] [--batch 256]

Noise and labels are `NoiseSet(noise_seed, "report", num_samples)`'s, the rows `experiments/evaluate.py
--noise_seed S` samples, so these images compare one to one with evaluate's `samples_<candidate>.npz`.
`--labels` (class-conditional models) cycles the given labels instead; `--prompts FILE` (text models, one prompt per
line) encodes new prompts with the checkpoint's copied text encoder (or `--prompt_embeds FILE.npz`); without them a
text model uses the prompts it was searched with. Nothing of the search, its calibration or teachers is loaded.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax.cpu_flags import apply_cpu_xla_flags  # noqa: E402
apply_cpu_xla_flags()  # before JAX starts: LLVM -O1 on CPU-only machines (tmpq_jax/cpu_flags.py)

FLAGS = flags.FLAGS


def define_flags():
    """The command line (defined only when run as a script, so the module imports next to others)."""
    flags.DEFINE_string("model", None, "Folder written by experiments/export.py.")
    flags.DEFINE_integer("num_samples", 16, "Images to generate.")
    flags.DEFINE_integer("noise_seed", 0, "Seed of the noise (purpose 'report', as evaluate.py --noise_seed).")
    flags.DEFINE_enum("mode", "dequant", ["dequant", "int"], "dequant: int8 codes dequantized in the forward; int: "
                      "integer convolutions and matmuls where the site allows.")
    flags.DEFINE_list("labels", [], "Class labels to cycle (class-conditional models); default: 0, 1, 2, ...")
    flags.DEFINE_string("prompts", "", "Text models: a file of prompts, one per line.")
    flags.DEFINE_string("prompt_embeds", "", "Text models: precomputed prompt embeddings (.npz).")
    flags.DEFINE_integer("batch", 0, "Images per sampler call (0: the search's sample_batch, so that the images equal "
                         "evaluate.py's bit for bit).")
    flags.DEFINE_string("out", "samples.npz", "Output .npz: images in [0, 1], labels, timesteps, noise seed.")
    flags.DEFINE_string("grid", "", "Optional PNG grid of the images.")


def parse_labels(values, num_classes: int) -> np.ndarray | None:
    if not values:
        return None
    try:
        labels = np.asarray([int(v) for v in values], np.int32)
    except ValueError as e:
        raise ValueError(f"--labels={','.join(values)!r} is invalid; valid: integers in [0, {num_classes - 1}]") from e
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if num_classes == 0 or bad.size:
        raise ValueError(f"--labels has {bad.tolist() or labels.tolist()}; valid: integers in [0, {num_classes - 1}]"
                         if num_classes else "--labels needs a class-conditional model; this one is unconditional")
    return labels


def generate(model_dir, num_samples: int, noise_seed: int, mode: str = "dequant", labels=(), prompts: str = "",
             prompt_embeds: str = "", batch: int = 0, progress: bool = True) -> tuple[np.ndarray, np.ndarray, object]:
    """(images in [-1, 1], labels, QuantizedModel)."""
    from tqdm.auto import tqdm

    from tmpq_jax import deploy, text
    from tmpq_jax.diffusion.noise import purpose_noise

    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is invalid; valid: an integer >= 1")
    if batch < 0:
        raise ValueError(f"batch={batch} is invalid; valid: an integer >= 1, or 0 for the search's sample_batch")
    ckpt = deploy.read_quantized(model_dir)
    spec = ckpt.spec
    if (prompts or prompt_embeds) and spec.conditioning != "text":
        raise ValueError(f"--prompts/--prompt_embeds need a text-to-image model; {model_dir} holds a "
                         f"{spec.conditioning!r}-conditioned {spec.family!r} model")
    fixed_labels = parse_labels(list(labels), spec.num_classes) if spec.conditioning == "class" else None
    if labels and spec.conditioning != "class":
        raise ValueError(f"--labels needs a class-conditional model; {model_dir} is {spec.conditioning!r}-conditioned")
    model = deploy.QuantizedModel.load(model_dir, mode)
    if prompts or prompt_embeds:
        pe = text.prompt_embeddings(prompts or None, prompt_embeds or None, model_dir, None, spec.cross_attention_dim,
                                    ckpt.config.get("search", {}).get("negative_prompt", ""))
        model = model.with_prompts(pe.embeds, pe.negative)
    if model.fallbacks:
        print(f"int mode: {len(model.fallbacks)} of {len(ckpt.sites)} sites run as fake-quant float32: "
              + "; ".join(sorted(set(model.fallbacks.values()))), flush=True)
    noise, default_labels = purpose_noise(noise_seed, "report", num_samples, spec.sample_shape, model.spec.num_classes)
    y = np.asarray(default_labels) if fixed_labels is None else np.resize(fixed_labels, num_samples)
    batch = batch or int(ckpt.config.get("search", {}).get("sample_batch", 256))
    bar = tqdm(total=num_samples, desc=f"generate ({mode}, {len(ckpt.timesteps)} steps)", unit="img",
               disable=not progress)
    images = model.sample(noise, np.asarray(y, np.int32), batch=batch, progress=bar.update)
    bar.close()
    return images, y, model


def main(argv):
    del argv
    if not FLAGS.model:
        raise app.UsageError("--model is required (a folder written by experiments/export.py)")
    from tmpq_jax import data
    from tmpq_jax.visual import save_grid

    t0 = time.time()
    images, labels, model = generate(FLAGS.model, FLAGS.num_samples, FLAGS.noise_seed, FLAGS.mode, FLAGS.labels,
                                     FLAGS.prompts, FLAGS.prompt_embeds, FLAGS.batch)
    unit = data.to_unit_range(images)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    np.savez(FLAGS.out, images=unit, labels=labels, timesteps=model.timesteps, noise_seed=FLAGS.noise_seed,
             noise_purpose="report", mode=FLAGS.mode)
    if FLAGS.grid:
        save_grid(FLAGS.grid, unit[:64])
    print(f"wrote {len(unit)} images to {FLAGS.out}{' and ' + FLAGS.grid if FLAGS.grid else ''} in "
          f"{time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
