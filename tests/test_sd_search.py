"""A Stable Diffusion search end to end on a tiny SD-shaped pipeline saved by diffusers' PyTorch classes: prompts,
guidance (BitOPs count both passes), VAE-decoded samples, and bad inputs failing before any long work."""

import importlib.util
import json

import numpy as np
import pytest

from tmpq_jax.search import run as search_run
from tmpq_jax.text import PromptEmbeddings, save_prompt_embeds

pytest.importorskip("torch")
from sd_helpers import save_tiny_sd  # noqa: E402

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
CONTEXT_DIM = 16  # the tiny UNet's cross_attention_dim


def load_config(name):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "experiments" / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    save_tiny_sd(path)
    rng = np.random.default_rng(0)
    embeds = tmp_path_factory.mktemp("text") / "embeds.npz"
    save_prompt_embeds(embeds, PromptEmbeddings(("a cat", "a dog", "a boat"),
                                                rng.normal(size=(3, 77, CONTEXT_DIM)).astype(np.float32),
                                                rng.normal(size=(3, 77, CONTEXT_DIM)).astype(np.float32), "test"))
    return path, embeds


def tiny_sd_config(sd_folder, **overrides):
    """The SD reference config shrunk to seconds: 2 steps, a population of 4, one generation."""
    c = load_config("sd")
    path, embeds = sd_folder
    c.model_dir, c.prompt_embeds, c.prompts_file = str(path), str(embeds), ""
    c.num_steps, c.population_size, c.generations = 2, 4, 1
    c.num_parents, c.num_mutation, c.num_crossover = 2, 1, 1
    c.search_samples, c.select_samples, c.final_samples, c.rescore_top_k = 3, 3, 3, 1
    c.reference_steps, c.calib_steps, c.calib_samples, c.calib_batch, c.sample_batch = 3, 2, 3, 2, 3
    c.baselines = ("uniform_w6a6",)
    c.reconstruct, c.recon_iters, c.recon_samples, c.recon_batch = True, 2, 6, 2  # every technique, in seconds
    for k, v in overrides.items():
        c[k] = v
    return c


def test_guidance_doubles_bitops(sd_folder):
    with_g = search_run.build_problem(tiny_sd_config(sd_folder))
    without = search_run.build_problem(tiny_sd_config(sd_folder, guidance_scale=1.0))
    assert with_g.spec.unet_passes_per_step == 2 and without.spec.unet_passes_per_step == 1
    np.testing.assert_array_equal(with_g.sites.macs, 2 * without.sites.macs)
    assert with_g.budget.limit == 2 * without.budget.limit
    assert with_g.sites.paths == without.sites.paths and not any("vae" in p for p in with_g.sites.paths)
    # (guidance 1.0 = the conditional UNet alone, and 7.5 = u + 7.5 (c - u): tests/test_sd.py)


@pytest.fixture(scope="module")
def sd_search(sd_folder, tmp_path_factory):
    """One generation of the tiny SD search: its workdir."""
    work = tmp_path_factory.mktemp("sd-search")
    search_run.run_search(tiny_sd_config(sd_folder), str(work))
    return work


def test_one_generation_sd_search_writes_decoded_samples(sd_search, sd_folder):
    c, tmp_path = tiny_sd_config(sd_folder), sd_search
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["model"]["family"] == "sd" and r["model"]["unet_passes_per_step"] == 2
    assert r["model"]["image_shape"] == [16, 16, 3] and r["model"]["sample_shape"] == [8, 8, 4]
    assert "VAE decoder runs in full precision" in r["bitops_definition"] and "2 UNet pass" in r["bitops_definition"]
    assert r["prompts"] == ["a cat", "a dog", "a boat"] and r["model"]["schedule"]["beta_schedule"] == "scaled_linear"
    assert r["best"]["bitops"] <= r["budget_bitops"]
    images = np.load(tmp_path / "samples_best.npz")["images"]
    assert images.shape == (3, 16, 16, 3) and 0.0 <= images.min() and images.max() <= 1.0
    assert (tmp_path / "samples_best.png").is_file()


def test_export_generate_and_diffusers_folder_of_the_sd_search(sd_search, sd_folder, tmp_path):
    """Export the best, generate from the export alone (decoded images equal evaluate's bit for bit), and write its
    dequantized UNet as a diffusers pipeline that loads back with the VAE and configs copied."""
    import subprocess
    import sys

    from flax.traverse_util import flatten_dict

    from tmpq_jax import deploy, models

    sys.path.insert(0, str(ROOT / "experiments"))
    import evaluate as ev

    def cli(script, *args):
        out = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *map(str, args)], cwd=ROOT,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]

    work = sd_search
    cli("export.py", "--workdir", work, "--candidate", "best", "--out", tmp_path / "q")
    ck = deploy.read_quantized(tmp_path / "q")
    assert ck.spec.family == "sd" and ck.spec.guidance_scale > 1 and ck.spec.num_classes == 3
    cli("generate.py", "--model", tmp_path / "q", "--num_samples", 3, "--noise_seed", 4, "--out", tmp_path / "s.npz")
    ev.evaluate(work, "best", 3, 4, ["teacher_mse"], tmp_path / "eval.json", reference="mnist-heldout", bootstrap=0)
    want = np.load(work / "eval_4" / "samples_best.npz")["images"]
    got = np.load(tmp_path / "s.npz")["images"]
    assert got.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(got, want)
    cli("export.py", "--workdir", work, "--candidate", "best", "--format", "diffusers", "--out", tmp_path / "hf")
    assert (tmp_path / "hf" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "hf" / "vae" / "config.json").is_file() and (tmp_path / "hf" / "model_index.json").is_file()
    _, params, _ = models.from_pretrained(tmp_path / "hf", family="sd")
    want_unet = flatten_dict(ck.dequantized_params()["unet"])
    for k, v in flatten_dict(params["unet"]).items():
        np.testing.assert_array_equal(np.asarray(v), want_unet[k], err_msg="/".join(k))


@pytest.mark.parametrize("overrides, match", [
    (dict(guidance_scale=0.5), r"guidance_scale=0.5 is invalid; valid: >= 1"),
    (dict(prompt_embeds=""), "needs prompts"),
    (dict(prompt_embeds="/nonexistent/embeds.npz"), "does not exist"),
    (dict(model_dir="/nonexistent/sd"), "does not exist.*download"),
])
def test_bad_sd_inputs_fail_at_validation(sd_folder, overrides, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        search_run.validate_config(tiny_sd_config(sd_folder, **overrides))


def test_embeddings_of_the_wrong_width_fail_before_loading(sd_folder, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, prompt_embeds=np.zeros((2, 77, 8), np.float32))
    with pytest.raises(ValueError, match=r"prompt_embeds has shape \(2, 77, 8\).*\(n, 77, 16\)"):
        search_run.build_problem(tiny_sd_config(sd_folder, prompt_embeds=str(bad)))


def test_guidance_needs_a_text_model():
    c = load_config("tiny")
    c.guidance_scale = 2.0
    with pytest.raises(ValueError, match="needs a text-conditioned model"):
        search_run.validate_config(c)


def test_groups_seed_teacher_and_calibration_follow_the_folder_schedule(sd_folder):
    """The tiny SD folder has steps_offset=1 and set_alpha_to_one=false (as SD 1.x): the step from t = 0 returns
    its input, so no group may hold it; the teacher and calibration run diffusers' own grid for the folder."""
    from diffusers import DDIMScheduler

    from tmpq_jax import diffusion

    c = tiny_sd_config(sd_folder, num_steps=4, reference_steps=7, calib_steps=5)
    problem = search_run.build_problem(c)
    space, schedule = problem.space, problem.spec.schedule
    assert (schedule.steps_offset, schedule.set_alpha_to_one) == (1, False)
    assert space.starts == (1, 89, 356, 801)  # the quad groups shifted by the offset
    np.testing.assert_array_equal(np.asarray(space.timesteps(space.seed())), [801, 356, 89, 1])
    ref = DDIMScheduler.from_pretrained(sd_folder[0] / "scheduler")
    for steps, ours in ((7, search_run.reference_timesteps(c, schedule)), (5, schedule.default_timesteps(5))):
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(ours, ref.timesteps.numpy())
    # every t a candidate can pick makes the last step move its input
    abar = schedule.alphas_cumprod()
    x, eps = np.full(3, 0.5), np.asarray([-1.0, 0.2, 1.0])
    step = diffusion.ddim_step(x, eps, abar[space.starts[0]], schedule.final_alpha_cumprod(), None)[0]
    assert np.abs(np.asarray(step) - x).max() > 1e-5


def test_zero_terminal_snr_with_epsilon_fails_at_config_time(sd_folder, tmp_path):
    import shutil

    folder = tmp_path / "zsnr"
    shutil.copytree(sd_folder[0], folder)
    cfg = folder / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "rescale_betas_zero_snr": True}))
    c = tiny_sd_config((folder, sd_folder[1]))
    with pytest.raises(ValueError, match=r"config.model_dir=.*zsnr.*rescale_betas_zero_snr=true gives abar_t = 0 at "
                                         r"t = 999.*prediction_type='epsilon'"):
        search_run.validate_config(c)
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "v_prediction"}))
    search_run.validate_config(c)
