"""NoiseSchedule vs diffusers' DDIMScheduler, v-prediction DDIM, latents without clipping, classifier-free guidance."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

from tmpq_jax import diffusion
from tmpq_jax.diffusion import NoiseSchedule

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# Real-looking scheduler configs (as published with the models).
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}
SD21 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
        "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None}
CIFAR10 = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
           "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
           "variance_type": "fixed_large"}
SDXL = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
        "use_karras_sigmas": False}


def _ddim_torch(schedule: NoiseSchedule) -> DDIMScheduler:
    return DDIMScheduler(**schedule.to_dict())


# --- arrays vs diffusers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {},
    {**SD, "set_alpha_to_one": False},
    {"beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": False},
    {"trained_betas": tuple(np.linspace(2e-4, 0.03, 1000)), "set_alpha_to_one": False},
    {"num_train_timesteps": 37, "beta_start": 0.001, "beta_end": 0.2},
], ids=["linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas", "short_linear"])
def test_alphas_cumprod_match_diffusers(kw):
    s = NoiseSchedule(**kw)
    ref = _ddim_torch(s)
    # diffusers rounds betas to float32; the cosine cap beta = 0.999 at t = T-1 loses 1e-5 relative there (atol).
    np.testing.assert_allclose(s.alphas_cumprod(), ref.alphas_cumprod.double().numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(s.final_alpha_cumprod(), float(ref.final_alpha_cumprod), rtol=1e-6)
    assert s.alphas_cumprod().dtype == np.float64 and s.betas().shape == (s.num_train_timesteps,)


def test_rescale_zero_terminal_snr_matches_diffusers():
    s = NoiseSchedule(**SD, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    base = torch.tensor(NoiseSchedule(**SD).betas(), dtype=torch.float64)
    exact = torch.cumprod(1 - rescale_zero_terminal_snr(base), 0).numpy()  # diffusers' algorithm in float64
    np.testing.assert_allclose(s.alphas_cumprod(), exact, rtol=1e-12, atol=1e-15)
    assert s.alphas_cumprod()[-1] == 0.0 and s.alphas_cumprod()[0] == pytest.approx(1 - 0.00085)
    # diffusers' float32 arrays: sqrt-space cancellation costs ~1e-5 relative mid-schedule
    np.testing.assert_allclose(s.alphas_cumprod(), _ddim_torch(s).alphas_cumprod.double().numpy(), atol=2e-5)


def test_default_schedule_is_the_mnist_one():
    s = NoiseSchedule()
    np.testing.assert_array_equal(s.alphas_cumprod(), diffusion.alphas_cumprod())
    assert s.sampler_kwargs() == {"prediction_type": "epsilon", "clip_x0": 1.0, "final_abar": 1.0,
                                  "clipped_eps": True}
    # a scheduler config always means diffusers' DDIM step (the model's own eps after clipping x0)
    folder = dataclasses.replace(s, clipped_model_output=False)
    assert NoiseSchedule.from_scheduler_config(s.to_dict()) == folder
    assert NoiseSchedule.from_scheduler_config(json.loads(json.dumps(s.to_dict()))) == folder


# --- configs ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,pred,clip,final_is_one", [
    (SD15, "epsilon", None, False), (SD21, "v_prediction", None, False), (CIFAR10, "epsilon", 1.0, True),
    (SDXL, "epsilon", None, False)], ids=["sd15", "sd21", "ddpm_cifar10", "sdxl_euler"])
def test_from_scheduler_config_real_configs(config, pred, clip, final_is_one):
    s = NoiseSchedule.from_scheduler_config(config)
    kw = s.sampler_kwargs()
    assert kw["prediction_type"] == pred and kw["clip_x0"] == clip
    assert (kw["final_abar"] == 1.0) == final_is_one
    # the same numbers as DDIMScheduler.from_config on the same dict, timesteps included
    ref = DDIMScheduler.from_config(config)
    np.testing.assert_allclose(s.alphas_cumprod(), ref.alphas_cumprod.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(kw["final_abar"], float(ref.final_alpha_cumprod), rtol=1e-6)
    for n in (1, 7, 50):
        ref.set_timesteps(n)
        np.testing.assert_array_equal(s.default_timesteps(n), ref.timesteps.numpy())
        assert s.default_timesteps(n).dtype == np.int32


def test_sd15_values():
    s = NoiseSchedule.from_scheduler_config(SD15)
    assert (s.beta_schedule, s.steps_offset, s.set_alpha_to_one, s.clip_sample) == ("scaled_linear", 1, False, False)
    assert s.final_alpha_cumprod() == pytest.approx(1 - 0.00085, rel=1e-12)
    np.testing.assert_array_equal(s.default_timesteps(4), [751, 501, 251, 1])


def test_missing_keys_take_the_class_defaults():
    # a PNDM config without clip_sample / set_alpha_to_one means no clipping and abar_0 after the last step
    s = NoiseSchedule.from_scheduler_config({"_class_name": "PNDMScheduler", **SD})
    assert s.sampler_kwargs()["clip_x0"] is None and not s.set_alpha_to_one
    # no class: DDIMScheduler's defaults
    assert NoiseSchedule.from_scheduler_config({}) == NoiseSchedule(clipped_model_output=False)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_default_timesteps_spacings_match_diffusers(spacing):
    s = NoiseSchedule(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref = _ddim_torch(s)
    for n in (1, 3, 10, 999):
        ref.set_timesteps(n)
        np.testing.assert_array_equal(s.default_timesteps(n), ref.timesteps.numpy())
    with pytest.raises(ValueError, match="num_steps"):
        s.default_timesteps(0)


def test_leading_offset_past_the_end_is_an_error():
    with pytest.raises(ValueError, match="t=1000"):
        NoiseSchedule(steps_offset=1).default_timesteps(1000)


@pytest.mark.parametrize("key,value,valid", [
    ("beta_schedule", "sigmoid", "linear, scaled_linear, squaredcos_cap_v2"),
    ("prediction_type", "flow_prediction", "epsilon, v_prediction, sample"),
    ("thresholding", True, "valid: false"),
    ("variance_type", "learned_range", "fixed_small"),
    ("timestep_spacing", "middle", "leading, trailing, linspace"),
    ("num_train_timesteps", 0, "integer >= 1"),
    ("beta_end", 1.5, "(0, 1)"),
    ("clip_sample", "yes", "true, false"),
    ("trained_betas", [0.1, 0.2], "1000 numbers"),
    ("foo_bar", 3, "valid keys: num_train_timesteps"),
])
def test_unsupported_config_values_name_value_file_and_valid_ones(key, value, valid):
    with pytest.raises(ValueError) as e:
        NoiseSchedule.from_scheduler_config({**SD21, key: value}, source="/m/scheduler/scheduler_config.json")
    msg = str(e.value)
    assert "/m/scheduler/scheduler_config.json" in msg and key in msg and valid in msg
    assert repr(value) in msg or str(value) in msg


def test_ignored_keys():
    s = NoiseSchedule.from_scheduler_config({**CIFAR10, "thresholding": False, "dynamic_thresholding_ratio": 0.9,
                                             "sample_max_value": 3.0, "timestep_type": "discrete",
                                             "solver_order": 2, "use_karras_sigmas": True})
    assert s == NoiseSchedule.from_scheduler_config(CIFAR10)


def test_from_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "scheduler_config.json").write_text(json.dumps(CIFAR10))
    assert NoiseSchedule.from_folder(tmp_path / "model") == NoiseSchedule(clipped_model_output=False)
    (tmp_path / "pipe" / "scheduler").mkdir(parents=True)
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21))
    assert NoiseSchedule.from_folder(tmp_path / "pipe").prediction_type == "v_prediction"
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        NoiseSchedule.from_folder(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "scheduler_config.json").write_text("{beta_start: 1")
    with pytest.raises(ValueError, match=r"bad/scheduler_config.json.*not valid JSON"):
        NoiseSchedule.from_folder(tmp_path / "bad")
    (tmp_path / "bad" / "scheduler_config.json").write_text(json.dumps({**SD21, "beta_schedule": "sigmoid"}))
    with pytest.raises(ValueError, match=r"bad/scheduler_config.json: unsupported beta_schedule='sigmoid'"):
        NoiseSchedule.from_folder(tmp_path / "bad")


# --- sampler ------------------------------------------------------------------------------------------------------

def _toy_np(x, t):
    return 0.3 * x + np.sin(t / 100.0)


def _toy_jax(x, t, y):
    return 0.3 * x + jnp.sin(t[:, None, None, None] / 100.0)


def _np_ddim(abar, ts, x, prediction_type, clip, final_abar):
    """Float64 reference: DDIM eq. 12 (sigma = 0) with v (Salimans & Ho 2022) or eps model outputs."""
    x = x.astype(np.float64)
    for i, t in enumerate(ts):
        a, a_prev = abar[t], (abar[ts[i + 1]] if i + 1 < len(ts) else final_abar)
        out = _toy_np(x, t)
        if prediction_type == "v_prediction":
            x0, eps = np.sqrt(a) * x - np.sqrt(1 - a) * out, np.sqrt(1 - a) * x + np.sqrt(a) * out
        else:
            x0, eps = (x - np.sqrt(1 - a) * out) / np.sqrt(a), out
        if clip is not None:
            x0 = np.clip(x0, -clip, clip)
            eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    return x if clip is None else np.clip(x, -clip, clip)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [None, 1.0, 2.5])
def test_ddim_matches_float64_reference(prediction_type, clip):
    s = NoiseSchedule(**SD, prediction_type=prediction_type, set_alpha_to_one=False,
                      clip_sample=clip is not None, clip_sample_range=clip or 1.0)
    abar, ts = s.alphas_cumprod(), [901, 640, 300, 41, 1]
    x = 3.0 * np.random.default_rng(0).normal(size=(2, 4, 4, 3))
    out = diffusion.ddim_sample(_toy_jax, jnp.asarray(abar, jnp.float32), jnp.asarray(ts), jnp.asarray(x, jnp.float32),
                                None, **s.sampler_kwargs())
    ref = _np_ddim(abar, ts, x, prediction_type, clip, s.final_alpha_cumprod())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers_step_loop(prediction_type):
    s = NoiseSchedule(**SD, prediction_type=prediction_type, set_alpha_to_one=False, clip_sample=False,
                      steps_offset=1)
    ref = _ddim_torch(s)
    ref.set_timesteps(6)
    ts = s.default_timesteps(6)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 3)).astype(np.float32)
    xt = torch.from_numpy(x)
    for t in ref.timesteps:  # the same toy model outputs, fed to diffusers' step
        xt = ref.step(0.3 * xt + float(np.sin(int(t) / 100.0)), t, xt, eta=0.0).prev_sample
    out = diffusion.ddim_sample(_toy_jax, jnp.asarray(s.alphas_cumprod(), jnp.float32), jnp.asarray(ts),
                                jnp.asarray(x), None, **s.sampler_kwargs())
    assert np.abs(xt.numpy()).max() > 1.0  # latents: nothing clipped
    np.testing.assert_allclose(out, xt.numpy(), rtol=1e-5, atol=1e-5)


def test_clipped_folder_schedule_matches_diffusers_ddim_pipeline_steps():
    """A folder's clip_sample=True (google/ddpm-cifar10-32): x0 clipped, the model's own eps kept, as diffusers'
    DDIMScheduler.step does by default (use_clipped_model_output=False); then the output clipped to [-1, 1]."""
    s = NoiseSchedule.from_scheduler_config(CIFAR10)
    assert s.clip_sample and not s.clipped_model_output and "clipped_model_output" not in s.to_dict()
    ref = DDIMScheduler.from_config(CIFAR10)
    ref.set_timesteps(10)
    x = 2.0 * np.random.default_rng(2).normal(size=(2, 4, 4, 3)).astype(np.float32)
    xt = torch.from_numpy(x)
    for t in ref.timesteps:
        xt = ref.step(0.3 * xt + float(np.sin(int(t) / 100.0)), t, xt, eta=0.0).prev_sample
    out = diffusion.ddim_sample(_toy_jax, jnp.asarray(s.alphas_cumprod(), jnp.float32),
                                jnp.asarray(ref.timesteps.numpy()), jnp.asarray(x), None, **s.sampler_kwargs())
    np.testing.assert_allclose(out, np.clip(xt.numpy(), -1, 1), rtol=1e-5, atol=1e-5)
    # the project's own default re-derives eps from the clipped x0, which differs here
    other = diffusion.ddim_sample(_toy_jax, jnp.asarray(s.alphas_cumprod(), jnp.float32),
                                  jnp.asarray(ref.timesteps.numpy()), jnp.asarray(x), None,
                                  **{**s.sampler_kwargs(), "clipped_eps": True})
    assert np.abs(np.asarray(other) - np.asarray(out)).max() > 1e-3


def _old_ddim_sample(eps_fn, abar, timesteps, noise, labels, clip_x0=True):
    """The sampler before schedules existed (eps, x0 and output clipped to [-1, 1], abar_prev = 1 at the end)."""
    timesteps = jnp.asarray(timesteps, jnp.int32)
    abar = jnp.asarray(abar, noise.dtype)
    abar_t = abar[timesteps]
    abar_prev = jnp.concatenate([abar_t[1:], jnp.ones((1,), abar.dtype)])

    def body(x, step):
        t, a_t, a_prev = step
        eps = eps_fn(x, jnp.full((x.shape[0],), t, jnp.int32), labels)
        x0 = (x - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
        if clip_x0:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps, None

    x, _ = jax.lax.scan(body, noise, (timesteps, abar_t, abar_prev))
    return jnp.clip(x, -1.0, 1.0)


@pytest.mark.parametrize("clip", [True, False])
def test_default_path_is_bit_identical_to_the_old_sampler(clip):
    abar = jnp.asarray(diffusion.alphas_cumprod(), jnp.float32)
    x = jnp.asarray(2.0 * np.random.default_rng(2).normal(size=(3, 4, 4, 1)), jnp.float32)
    ts = jnp.asarray([999, 700, 350, 20, 0])
    old = np.asarray(_old_ddim_sample(_toy_jax, abar, ts, x, None, clip))
    np.testing.assert_array_equal(diffusion.ddim_sample(_toy_jax, abar, ts, x, None, clip), old)
    if clip:
        np.testing.assert_array_equal(
            diffusion.ddim_sample(_toy_jax, abar, ts, x, None, **NoiseSchedule().sampler_kwargs()), old)


def test_latents_are_not_clipped():
    s = NoiseSchedule(**SD, clip_sample=False)
    abar = jnp.asarray(s.alphas_cumprod(), jnp.float32)
    x = jnp.asarray(3.0 * np.random.default_rng(3).normal(size=(2, 4, 4, 4)), jnp.float32)
    ts = jnp.asarray([500, 10])
    out = np.asarray(diffusion.ddim_sample(_toy_jax, abar, ts, x, None, **s.sampler_kwargs()))
    assert s.sampler_kwargs()["clip_x0"] is None and np.abs(out).max() > 2.0
    np.testing.assert_allclose(out, _np_ddim(s.alphas_cumprod(), [500, 10], np.asarray(x), "epsilon", None, 1.0),
                               rtol=1e-5, atol=1e-5)
    # clip_x0=False keeps the old meaning (x0 unclipped, output in [-1, 1]); a range clips to it
    assert np.abs(diffusion.ddim_sample(_toy_jax, abar, ts, x, None, clip_x0=False)).max() <= 1.0
    assert np.abs(diffusion.ddim_sample(_toy_jax, abar, ts, x, None, clip_x0=1.5)).max() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="clip_x0"):
        diffusion.ddim_sample(_toy_jax, abar, ts, x, None, clip_x0=-1.0)


# --- classifier-free guidance -------------------------------------------------------------------------------------

class _TextModel:
    """A toy text-conditioned model that records the batch of every call."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, emb):
        self.batches.append(x.shape[0])
        return 0.3 * x + 0.5 * jnp.mean(emb, axis=(1, 2))[:, None, None, None] + jnp.sin(t / 100.0)[:, None, None, None]


def _text_inputs(b=2):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(b, 4, 4, 4)), jnp.float32)
    cond, uncond = (jnp.asarray(rng.normal(size=(b, 77, 8)), jnp.float32) for _ in range(2))
    return x, jnp.full((b,), 500, jnp.int32), cond, uncond


def test_guidance_scale_one_is_the_conditional_model_in_one_pass():
    x, t, c, u = _text_inputs()
    model = _TextModel()
    np.testing.assert_array_equal(diffusion.guided(model, 1.0)(x, t, (c, u)), _TextModel()(x, t, c))
    assert model.batches == [2] and diffusion.passes_per_step(1.0) == 1


def test_guidance_runs_one_double_batch_and_mixes_outputs():
    x, t, c, u = _text_inputs()
    model = _TextModel()
    out = diffusion.guided(model, 7.5)(x, t, (c, u))
    assert model.batches == [4] and diffusion.passes_per_step(7.5) == 2
    out_c, out_u = _TextModel()(x, t, c), _TextModel()(x, t, u)
    np.testing.assert_allclose(out, out_u + 7.5 * (out_c - out_u), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale,batch", [(1.0, 2), (7.5, 4)])
def test_guided_sampling_calls_the_model_once_per_step(scale, batch):
    x, _, c, u = _text_inputs()
    s = NoiseSchedule(**SD, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False)
    model = _TextModel()
    with jax.disable_jit():  # scan runs step by step, so every model call is seen
        diffusion.ddim_sample(diffusion.guided(model, scale), jnp.asarray(s.alphas_cumprod(), jnp.float32),
                              jnp.asarray([801, 401, 1]), x, (c, u), **s.sampler_kwargs())
    assert model.batches == [batch] * 3


@pytest.mark.parametrize("scale", [0.5, 0.0, float("nan"), float("inf")])
def test_bad_guidance_scale(scale):
    with pytest.raises(ValueError, match=r"guidance_scale=.*valid: >= 1"):
        diffusion.guided(_TextModel(), scale)
    with pytest.raises(ValueError, match=str(scale)):
        diffusion.passes_per_step(scale)


# --- where the search's groups begin (no identity step) ---------------------------------------------------------


@pytest.mark.parametrize("kw,first", [
    ({}, 0),  # the MNIST default: abar = 1 after the last step, so t = 0 is a real step
    ({"set_alpha_to_one": False}, 1),  # the step from t = 0 would go to abar_0 = abar_t
    ({"set_alpha_to_one": False, "steps_offset": 1}, 1),  # SD 1.x
    ({"steps_offset": 3}, 3),
    ({"steps_offset": 3, "timestep_spacing": "trailing"}, 0),  # diffusers adds the offset under 'leading' only
])
def test_first_timestep(kw, first):
    assert NoiseSchedule(**kw).first_timestep() == first


@pytest.mark.parametrize("kw", [{}, {"set_alpha_to_one": False}, {**SD, "set_alpha_to_one": False, "steps_offset": 1}])
def test_no_timestep_from_first_on_is_an_identity_last_step(kw):
    """The last DDIM step from any t >= first_timestep() changes its input; from t = first - 1 >= 0 it does not
    (when set_alpha_to_one is False and there is no offset, that is t = 0)."""
    s = NoiseSchedule(**kw)
    abar = s.alphas_cumprod()
    x, eps = np.full(4, 0.7), np.linspace(-1, 1, 4)

    def last_step(t):
        return np.asarray(diffusion.ddim_step(x, eps, abar[t], s.final_alpha_cumprod(), None)[0])

    assert np.abs(last_step(s.first_timestep()) - x).max() > 1e-6
    if not s.set_alpha_to_one and s.first_timestep() == 1:
        np.testing.assert_allclose(last_step(0), x, rtol=1e-6)  # float32: 1.7e-8 measured


def test_zero_terminal_snr_with_epsilon_is_an_error_and_v_prediction_is_not():
    eps = NoiseSchedule(rescale_betas_zero_snr=True, set_alpha_to_one=False)
    with pytest.raises(ValueError, match=r"rescale_betas_zero_snr=true gives abar_t = 0 at t = 999.*v_prediction"):
        eps.check_sampleable(source="f.json")
    eps.check_sampleable([998, 500, 1])  # a schedule that never visits T-1 is fine
    NoiseSchedule(rescale_betas_zero_snr=True, prediction_type="v_prediction").check_sampleable()
    # without the check: DDIM at t = 999 makes NaN (what the search used to score silently as infeasible)
    abar = eps.alphas_cumprod()
    x0 = diffusion.ddim_step(np.ones(2), np.ones(2), abar[999], abar[500], None)[1]
    assert not np.isfinite(np.asarray(x0)).all()
