import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax import diffusion


def test_alphas_cumprod_matches_float64_loop():
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    ref, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        ref.append(acc)
    np.testing.assert_allclose(diffusion.alphas_cumprod(), ref, rtol=1e-12)
    assert diffusion.alphas_cumprod()[-1] < 1e-4 < diffusion.alphas_cumprod()[0]


def _numpy_ddim(eps_fn, abar, ts, x, clip):
    x = x.astype(np.float64)
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = eps_fn(x, t)
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        if clip:
            x0 = np.clip(x0, -1, 1)
            eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    return np.clip(x, -1, 1)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("ts", [[999, 500, 20, 0], [750, 3], [10]])
def test_ddim_matches_float64_reference(clip, ts):
    abar = diffusion.alphas_cumprod()
    x = np.random.default_rng(0).normal(size=(3, 4, 4, 1))

    def eps_np(x, t):
        return 0.3 * x + np.sin(t / 100.0)

    def eps_jax(x, t, y):
        return 0.3 * x + jnp.sin(t[:, None, None, None] / 100.0)

    out = diffusion.ddim_sample(eps_jax, jnp.asarray(abar, jnp.float32), jnp.asarray(ts), jnp.asarray(x, jnp.float32),
                                jnp.zeros(3, jnp.int32), clip_x0=clip)
    np.testing.assert_allclose(out, _numpy_ddim(eps_np, abar, ts, x, clip), atol=2e-5)


def test_trajectory_holds_unet_inputs():
    abar = jnp.asarray(diffusion.alphas_cumprod(), jnp.float32)
    x = jnp.ones((2, 2, 2, 1))
    _, traj = diffusion.ddim_sample(lambda x, t, y: 0.1 * x, abar, jnp.asarray([900, 100]), x, jnp.zeros(2),
                                    return_trajectory=True)
    assert traj.x.shape == (2, 2, 2, 2, 1)
    np.testing.assert_array_equal(traj.t, [900, 100])
    np.testing.assert_array_equal(traj.x[0], x)
    assert not np.allclose(traj.x[1], x)


def test_population_vmap_and_map_equal_single(tiny):
    # x0_hat divides eps by sqrt(abar_t): 1/158 at t=999, so fp32 rounding differences of batched convolutions
    # grow 100x there. Up to t=600 the gain is <= 7x and 1e-5 is a fair fp32 tolerance.
    pop = jnp.asarray([[600, 400], [500, 10], [450, 250]])
    eps = tiny.eps_fn(tiny.params)

    def one(ts):
        return diffusion.ddim_sample(eps, tiny.abar, ts, tiny.noise, tiny.labels)

    singles = np.stack([np.asarray(jax.jit(one)(ts)) for ts in pop])
    np.testing.assert_allclose(jax.jit(jax.vmap(one))(pop), singles, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda p: jax.lax.map(one, p))(pop), singles, atol=1e-5)


def test_fixed_seed_gives_identical_samples(tiny):
    def run(seed):
        noise = jax.random.normal(jax.random.key(seed), tiny.noise.shape)
        return np.asarray(diffusion.ddim_sample(tiny.eps_fn(tiny.params), tiny.abar, jnp.asarray([900, 300]), noise,
                                                tiny.labels))

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_schedules():
    np.testing.assert_array_equal(diffusion.quad_timesteps(10), [800, 632, 483, 355, 246, 158, 88, 39, 9, 0])
    np.testing.assert_array_equal(diffusion.uniform_timesteps(4), [750, 500, 250, 0])
    with pytest.raises(ValueError, match="strictly descending"):
        diffusion.validate_timesteps([5, 5, 1])
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        diffusion.validate_timesteps([1000, 3])
    with pytest.raises(ValueError, match="num_steps"):
        diffusion.uniform_timesteps(0)


@pytest.mark.parametrize("n, batch, want", [
    (5, 2, [([0, 1], 2), ([2, 3], 2), ([4, 4], 1)]),  # the last batch repeats its last row
    (3, 8, [([0, 1, 2], 3)]),  # n < batch: one batch of n rows, no padding
    (4, 4, [([0, 1, 2, 3], 4)]),
    (7, 3, [([0, 1, 2], 3), ([3, 4, 5], 3), ([6, 6, 6], 1)]),
    (0, 4, []),
])
def test_fixed_batches(n, batch, want):
    from tmpq_jax.diffusion.noise import fixed_batches

    got = [(np.asarray(idx).tolist(), real) for idx, real in fixed_batches(n, batch)]
    assert got == want


@pytest.mark.parametrize("n, batch", [(4, 0), (-1, 2)])
def test_fixed_batches_refuses_bad_sizes(n, batch):
    from tmpq_jax.diffusion.noise import fixed_batches

    with pytest.raises(ValueError, match=rf"fixed_batches\(n={n}, batch={batch}\) is invalid"):
        list(fixed_batches(n, batch))
