"""Cached artefacts of a workdir: keys built from every setting that changes them (`search.cache`), the calibration
and teacher stages reusing or recomputing by those keys, checks of what is loaded or freshly made, and calibration of
a module called twice per forward."""

import dataclasses
import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax import checkpoint, models, quant
from tmpq_jax.search import run as run_mod
from tmpq_jax.search.cache import CACHE_SETTINGS, cache_key, cache_tag, key_diff
from tmpq_jax.search.fitness import NoiseSet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "configs"))
import tiny  # noqa: E402

# a value different from tiny's for every setting any cache key reads
CHANGED = {"model": "cifar-ddpm", "guidance_scale": 7.5, "negative_prompt": "blurry",
           "memory_efficient_attention": True, "split_head_dim": True, "matmul_precision": "high",
           "calib_steps": 5, "calib_samples": 9, "calib_batch": 64, "seed": 3, "bit_choices": (8, 6),
           "rules": [dict(pattern="conv_in$", w_bits=8, a_bits=8)], "probs_8bit": False, "first_last_bits": 7,
           "reference_steps": 7,
           "sample_batch": 17, "strategy": "vmap", "chunk_size": 4, "calib_trajectories": "uniform",
           "calib_schedules": 2, "calib_ranges": "shared", "act_range_norm": 4.0, "unclipped_sites": ("conv_in$",), "unclipped_min_bits": 6, "num_steps": 4, "spacing": "uniform", "group_starts": (0, 5),
           "split_skip": False, "reconstruct": False, "recon_samples": 8, "recon_iters": 5, "recon_batch": 2,
           "recon_lr_round": 0.5, "recon_lr_act": 0.5, "recon_reg": 0.5, "recon_warmup": 0.5}


@pytest.mark.parametrize("kind,setting", [(k, s) for k, names in CACHE_SETTINGS.items() for s in names])
def test_every_setting_of_a_cache_key_changes_it(kind, setting):
    c = tiny.get_config()
    before = cache_key(kind, c, "sha")
    assert c[setting] != CHANGED[setting]
    c[setting] = CHANGED[setting]
    after = cache_key(kind, c, "sha")
    assert key_diff(before, after) == [setting] and cache_tag(before) != cache_tag(after)


def test_keys_hold_the_model_digest_and_the_content():
    c = tiny.get_config()
    base = cache_key("teacher", c, "sha", noise=(0, "fitness", 8))
    assert key_diff(base, cache_key("teacher", c, "other", noise=(0, "fitness", 8))) == ["model_sha256"]
    assert key_diff(base, cache_key("teacher", c, "sha", noise=(0, "fitness", 9))) == ["noise"]
    assert key_diff(None, base) == sorted(base)  # no stored key: nothing matches
    # settings that do not change the content are not in any key
    for name in ("generations", "population_size", "metric", "report_metrics", "final_samples"):
        assert all(name not in names for names in CACHE_SETTINGS.values())
    with pytest.raises(ValueError, match="unknown cache kind 'nope'"):
        cache_key("nope", c, "sha")


# --- the calibration stage ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_problem():
    c = tiny.get_config()
    c.checkpoint = str(ROOT / c.checkpoint)
    c.reconstruct = False  # keys, not reconstruction, are tested here (test_calibration, the end-to-end search)
    return c, run_mod.build_problem(c)


def test_calibration_tables_are_reused_only_under_the_same_settings(tiny_problem, tmp_path, monkeypatch, capsys):
    c, problem = tiny_problem
    tables = run_mod.calibrate(c, problem, tmp_path)  # the real calibration, once
    calls = []
    monkeypatch.setattr(run_mod.quant, "calibrate", lambda *a, **k: calls.append(1) or tables)
    run_mod.calibrate(c, problem, tmp_path)
    assert calls == [] and "loading calibration tables" in capsys.readouterr().out
    changed = c.copy_and_resolve_references()
    for setting, value in (("calib_batch", 4), ("matmul_precision", "high")):  # each against the last tables
        changed[setting] = value
        run_mod.calibrate(changed, problem, tmp_path)
        assert f"made under other settings ({setting}); recalibrating" in capsys.readouterr().out
    assert len(calls) == 2


# --- the teacher stage ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FakeEvaluator:
    fill: float = 0.25
    calls: int = 0
    teachers: dict = dataclasses.field(default_factory=dict)

    def sample_fp(self, timesteps, noise_set):
        self.calls += 1
        images = np.full((noise_set.n, 28, 28, 1), self.fill, np.float32)
        images[-1, 0, 0, 0] = self.fill * 2  # one sample differs, to count NaN samples below
        return images


def _fake_problem():
    spec = models.get_spec("mnist-small")
    return run_mod.Problem(spec, None, None, None, None, None, "sha")


def test_teachers_are_reused_only_under_the_same_settings(tmp_path):
    c, problem, noise = tiny.get_config(), _fake_problem(), NoiseSet(0, "fitness", 4)
    ev = FakeEvaluator()
    first = run_mod.teacher_images(c, problem, ev, noise, tmp_path)
    run_mod.teacher_images(c, problem, ev, noise, tmp_path)
    assert ev.calls == 1 and ev.teachers[noise] is not None
    c.sample_batch = 3  # another batch size: float rounding may differ, so a new teacher
    run_mod.teacher_images(c, problem, ev, noise, tmp_path)
    assert ev.calls == 2 and len(list(tmp_path.glob("teacher_fitness_*.npz"))) == 2
    # a file without its key (an older version) is not trusted
    c.sample_batch = tiny.get_config().sample_batch
    path = tmp_path / f"teacher_fitness_{cache_tag(run_mod.teacher_key(c, problem, noise))}.npz"
    np.savez(path, images=first)
    run_mod.teacher_images(c, problem, ev, noise, tmp_path)
    assert ev.calls == 3


def test_a_non_finite_fresh_teacher_is_an_error_before_any_search(tmp_path):
    ev = FakeEvaluator(fill=float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite images for 3 of 3 samples of NoiseSet\(seed=0, "
                                                 r"purpose='select', n=3\).*every paired score would be NaN"):
        run_mod.teacher_images(tiny.get_config(), _fake_problem(), ev, NoiseSet(0, "select", 3), tmp_path)
    assert not list(tmp_path.glob("teacher_*"))  # nothing cached


# --- loaded tables --------------------------------------------------------------------------------------------------


SITES = quant.SiteTable((quant.Site("conv", "conv", 100, 4, kernel_shape=(1, 1, 2, 4)),
                         quant.Site("attn/qk", "matmul", 50, 0)))


def _tables(**change):
    t = dict(table_bits=jnp.asarray([6, 8]), w_clip={"conv": jnp.ones((2, 4))}, a_range=jnp.ones((2, 3, 2, 2)),
             w_range=jnp.ones((2, 3, 2, 2)), skip_range=jnp.zeros((2, 3, 2, 2)),
             group_starts=jnp.asarray([0, 10, 100]), w_round={})
    t.update(change)
    return quant.QuantTables(**t)


@pytest.mark.parametrize("change,msg", [
    (dict(a_range=jnp.ones((2, 3, 1, 2))), r"a_range has shape \(2, 3, 1, 2\), expected \(2, 3, 2, 2\)"),
    (dict(w_range=jnp.ones((3, 3, 2, 2))), r"w_range has shape \(3, 3, 2, 2\), expected \(2, 3, 2, 2\)"),
    (dict(skip_range=jnp.ones((2, 1, 2, 2))), r"skip_range has shape \(2, 1, 2, 2\), expected \(2, 3, 2, 2\)"),
    (dict(group_starts=jnp.asarray([0, 100, 10])), r"group_starts is \[0, 100, 10\], expected \(G,\) ascending"),
    (dict(w_round={"conv": jnp.zeros((2, 4), jnp.uint8)}),
     r"w_round of site 'conv' is uint8 \(2, 4\), expected uint8 \(2, 1\)"),
    (dict(w_round={"conv": jnp.zeros((2, 1), jnp.int32)}), r"w_round of site 'conv' is int32"),
    (dict(w_clip={"conv": jnp.ones((2, 3))}), r"w_clip of site 'conv' has shape \(2, 3\), expected \(2, 4\)"),
    (dict(w_clip={}), r"w_clip entries do not match the weight sites \(missing \['conv'\]"),
    (dict(table_bits=jnp.asarray([[6, 8]])), r"table_bits has shape \(1, 2\)"),
])
def test_load_tables_checks_shapes(tmp_path, change, msg):
    path = tmp_path / "t.msgpack"
    quant.save_tables(path, _tables(), SITES)
    quant.load_tables(path, SITES, [8, 6])  # the good file loads
    quant.save_tables(path, _tables(**change), SITES)
    with pytest.raises(checkpoint.CheckpointError, match=msg):
        quant.load_tables(path, SITES)


# --- a module called twice per forward ------------------------------------------------------------------------------


class SharedDense(nn.Module):
    """One Dense applied to two inputs of very different ranges (weight sharing): one site, MACs of both calls."""

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(3, name="shared")
        return dense(x) + dense(10.0 * x + 5.0)


def test_a_module_called_twice_is_calibrated_on_both_calls():
    m = SharedDense()
    x = jnp.linspace(-1.0, 1.0, 8 * 4).reshape(8, 4)
    params = m.init(jax.random.key(0), x[:1])["params"]
    apply_fn = lambda p, xx: m.apply({"params": p}, xx)  # noqa: E731
    sites = quant.discover_sites(apply_fn, params, (x[:1],), rules=())
    assert sites.paths == ("shared",) and int(sites.macs[0]) == 2 * 4 * 3
    tables = quant.calibrate(apply_fn, params, sites, [(x,)], [8])
    lo, hi = np.asarray(tables.a_range[0, 0, 0])
    # the second call's inputs span [-5, 15]: the range must reach them, not stop at the first call's [-1, 1]
    assert lo <= -1.0 and hi >= 10.0, (lo, hi)
