"""A small MNIST CNN whose penultimate layer is the feature space of the project's default fitness metric."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

FEATURE_DIM = 128


class MnistClassifier(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-dense128-dense10. Returns (logits, 128-d features)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        for width in (32, 64):
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.relu(nn.Dense(FEATURE_DIM)(x))
        h = nn.Dropout(0.3, deterministic=not train)(features)
        return nn.Dense(10)(h), features


def classifier_init(key: jax.Array):
    return MnistClassifier().init(key, jnp.zeros((1, 28, 28, 1)))["params"]


def train_classifier(train_images, train_labels, test_images, test_labels, epochs: int = 20,
                     batch_size: int = 128, seed: int = 0, learning_rate: float = 1e-3):
    """Adam on random +-2 px shifts of the training digits. Returns (params, held-out accuracy per epoch)."""
    import numpy as np
    import optax
    from tqdm.auto import tqdm

    key = jax.random.key(seed)
    params = classifier_init(key)
    tx = optax.adam(learning_rate)
    opt_state = tx.init(params)
    model = MnistClassifier()

    @jax.jit
    def step(params, opt_state, x, y, k):
        k_shift, k_drop = jax.random.split(k)
        shifts = jax.random.randint(k_shift, (2,), -2, 3)
        x = jnp.roll(x, shifts, axis=(1, 2))

        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x, train=True, rngs={"dropout": k_drop})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, x: model.apply({"params": p}, x)[0].argmax(-1))
    rng = np.random.default_rng(seed)
    accs = []
    for epoch in tqdm(range(epochs), desc="classifier", unit="epoch"):
        perm = rng.permutation(len(train_images))
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            key, k = jax.random.split(key)
            params, opt_state, _ = step(params, opt_state, train_images[idx], train_labels[idx], k)
        accs.append(float((np.asarray(predict(params, test_images)) == test_labels).mean()))
    return params, accs
