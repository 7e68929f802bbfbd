"""DDPM training with optax AdamW, EMA weights, periodic checkpoints and exact resume.

Every batch is drawn from `fold_in(data_key, step)`, so a resumed run sees the same batches as an uninterrupted
one and ends in the same state.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from tmpq_jax import checkpoint, data, diffusion, models
from tmpq_jax.visual import save_grid

STATE_FILE = "train_state.msgpack"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(1, config.warmup_steps),
                                                  max(config.num_steps, config.warmup_steps + 1),
                                                  config.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                       optax.adamw(schedule, weight_decay=config.weight_decay))


def validate_train_config(config: ml_collections.ConfigDict) -> None:
    checks = [
        ("batch_size", config.batch_size >= 1, ">= 1"),
        ("num_steps", config.num_steps >= 1, ">= 1"),
        ("learning_rate", 0 < config.learning_rate < 1, "in (0, 1)"),
        ("ema_decay", 0 <= config.ema_decay < 1, "in [0, 1)"),
        ("checkpoint_every", config.checkpoint_every >= 1, ">= 1"),
        ("sample_steps", 1 <= config.sample_steps <= diffusion.NUM_TRAIN_TIMESTEPS, "in [1, 1000]"),
    ]
    for name, ok, valid in checks:
        if not ok:
            raise ValueError(f"config.{name}={config[name]!r} is invalid; valid range: {valid}")
    models.get_spec(config.model)


def load_train_data(config: ml_collections.ConfigDict, spec: models.ModelSpec) -> data.Dataset:
    ds = data.load_dataset(config.dataset, config.get("dataset_path") or None, spec.image_size)
    if ds.images.shape[1:] != spec.sample_shape:
        raise data.DataError(f"dataset images have shape {ds.images.shape[1:]}, model {spec.name!r} expects "
                             f"{spec.sample_shape}")
    return ds


def train(config: ml_collections.ConfigDict, workdir: str, resume: bool = False) -> dict:
    """Train the UNet named by `config.model`; write checkpoints, EMA params, a sample grid and a summary."""
    validate_train_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = models.get_spec(config.model)
    model = models.build_model(spec)
    ds = load_train_data(config, spec)
    images = jnp.asarray(ds.images)
    labels = jnp.asarray(np.where(ds.labels < 0, spec.num_classes, ds.labels) if spec.num_classes else
                         np.full_like(ds.labels, spec.num_classes))
    abar = jnp.asarray(diffusion.alphas_cumprod(), jnp.float32)
    tx = make_optimizer(config)

    # init or resume
    key = jax.random.key(config.seed)
    init_key, data_key = jax.random.split(key)
    params = models.init_params(spec, init_key)
    state = TrainState(jnp.asarray(0, jnp.int32), params, params, tx.init(params))
    state_path = workdir / STATE_FILE
    if resume and state_path.exists():
        state = checkpoint.load_tree(state_path, state)
        print(f"resumed from {state_path} at step {int(state.step)}", flush=True)
    elif resume:
        print(f"--resume: no {state_path}, starting from step 0", flush=True)

    def eps_fn(p, x, t, y):
        return model.apply({"params": p}, x, t, y)

    @jax.jit
    def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
        step_key = jax.random.fold_in(data_key, state.step)
        k_idx, k_loss = jax.random.split(step_key)
        idx = jax.random.randint(k_idx, (config.batch_size,), 0, images.shape[0])
        x0, y = images[idx], labels[idx]
        loss, grads = jax.value_and_grad(
            lambda p: diffusion.eps_loss(lambda x, t, yy: eps_fn(p, x, t, yy), abar, k_loss, x0, y))(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optax.incremental_update(params, state.ema_params, 1.0 - config.ema_decay)
        return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), loss

    # train
    start_step, t0 = int(state.step), time.time()
    losses = []
    with tqdm(total=config.num_steps, initial=start_step, desc="train", unit="step", mininterval=2.0) as bar:
        for step in range(start_step, config.num_steps):
            state, loss = train_step(state, images, labels)
            bar.update(1)
            if (step + 1) % 50 == 0 or step + 1 == config.num_steps:  # host sync only every 50 steps
                losses.append(float(loss))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.num_steps:
                checkpoint.save_tree(state_path, state)
    train_seconds = time.time() - t0

    # export EMA params, sample grid
    sha = checkpoint.save_tree(workdir / "ema_params.msgpack", state.ema_params)
    summary = {"model": spec.name, "steps": int(state.step), "train_seconds_this_run": round(train_seconds, 1),
               "steps_this_run": int(state.step) - start_step, "final_loss": losses[-1] if losses else None,
               "ema_params_sha256": sha, "params": models.count_params(state.ema_params),
               "device": jax.devices()[0].device_kind, "platform": platform.platform(),
               "jax": jax.__version__, "config": config.to_dict()}
    if config.sample_grid:
        n = 64
        noise = jax.random.normal(jax.random.key(config.seed + 1), (n, *spec.sample_shape))
        y = jnp.arange(n) % max(spec.num_classes, 1) if spec.num_classes else jnp.full((n,), 0)
        ts = diffusion.uniform_timesteps(config.sample_steps)
        sample = jax.jit(lambda p: diffusion.ddim_sample(lambda x, t, yy: eps_fn(p, x, t, yy), abar, ts, noise, y))
        print(f"sampling {n} images with {config.sample_steps} DDIM steps", flush=True)
        save_grid(workdir / "samples.png", data.to_unit_range(np.asarray(sample(state.ema_params))))
    (workdir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
