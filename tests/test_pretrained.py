"""Local diffusers folders through the model registry: detection, `from_pretrained`, `convert.py`, and a search on a
random `UNet2DModel` saved with diffusers' PyTorch class (the path a downloaded google/ddpm-cifar10-32 takes)."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax import models, quant
from tmpq_jax.search import run as search_run
from unet2d_helpers import save_unet2d_folder

torch = pytest.importorskip("torch")
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def unet2d_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddpm-tiny")
    return path, save_unet2d_folder(path)


def torch_output(model, x_nhwc, t):
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2).copy()), torch.from_numpy(np.asarray(t)))
    return out.sample.numpy().transpose(0, 2, 3, 1)


def flax_output(folder, x, t):
    model, params, spec = models.from_pretrained(folder)
    return np.asarray(model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.zeros(len(t), jnp.int32)))


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_from_pretrained_model_folder(unet2d_folder):
    path, torch_model = unet2d_folder
    model, params, spec = models.from_pretrained(path)
    assert (spec.family, spec.conditioning, spec.sample_shape) == ("unet2d", "none", (8, 8, 3))
    assert spec.schedule.beta_schedule == "linear" and spec.schedule.clip_sample
    assert models.count_params(params) == sum(p.numel() for p in torch_model.parameters())
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    t = np.array([10, 900], np.int32)
    assert rel_err(flax_output(path, x, t), torch_output(torch_model, x, t)) < 5e-4


def test_pipeline_layout_and_detection(tmp_path):
    save_unet2d_folder(tmp_path, pipeline_layout=True)
    assert models.detect_family(tmp_path).name == "unet2d"
    spec = models.read_spec(tmp_path, "unet2d")
    assert spec.sample_shape == (8, 8, 3) and spec.schedule.num_train_timesteps == 1000


def test_convert_cli_writes_a_folder_that_loads_without_torch_weights(unet2d_folder, tmp_path):
    path, _ = unet2d_folder
    out = tmp_path / "flax"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "convert.py"), "--model_dir", str(path),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "diffusion_flax_model.msgpack").is_file() and not list(out.glob("*.safetensors"))
    _, p_src, s_src = models.from_pretrained(path)
    _, p_out, s_out = models.from_pretrained(out)
    assert s_out.schedule == s_src.schedule and s_out.unet == s_src.unet
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p_src, p_out)
    # the converted folder changes the model digest only through its files, never silently
    assert models.folder_digest(out) != models.folder_digest(path)


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist.*download"),
    ("empty", "not a model folder"),
    ("no_scheduler", "scheduler_config.json"),
    ("bad_json", "not valid JSON"),
])
def test_bad_folders_fail_clearly(unet2d_folder, tmp_path, case, match):
    path, _ = unet2d_folder
    target = tmp_path / "m"
    if case != "missing":
        target.mkdir()
    if case in ("no_scheduler", "bad_json"):
        for f in path.iterdir():
            shutil.copy(f, target / f.name)
        (target / "scheduler_config.json").unlink()
        if case == "bad_json":
            (target / "scheduler_config.json").write_text("{not json")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        models.from_pretrained(target)


def test_config_model_and_model_dir_must_agree(unet2d_folder):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", ROOT / "experiments" / "configs" / "default.py")
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    c = cfg.get_config()
    c.model_dir = str(unet2d_folder[0])
    with pytest.raises(ValueError, match="must be a model family.*unet2d"):
        search_run.validate_config(c)
    c.model, c.model_dir = "unet2d", ""
    with pytest.raises(ValueError, match="model_dir=PATH"):
        search_run.validate_config(c)


def test_sites_bitops_and_population_through_the_port(unet2d_folder):
    path, _ = unet2d_folder
    model, params, spec = models.from_pretrained(path)

    def apply(p, *a):
        return model.apply({"params": p}, *a)

    sites = quant.discover_sites(apply, models.param_shapes(spec), models.example_inputs(spec), rules=())
    kinds = [s.kind for s in sites.sites]
    assert kinds.count("matmul") == 2 * 4  # qk and av of 1 down, 2 up and 1 mid attention block
    assert kinds.count("conv") > 0 and kinds.count("dense") > 0
    assert quant.fp_bitops(sites, 10) == 10 * 32 * 32 * int(sites.macs.sum())


def load_config(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "experiments" / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.slow  # about 25 s; the default suite runs the same path end to end on the SD folder (test_sd_search.py)
def test_one_generation_search_on_a_unet2d_folder(unet2d_folder, tmp_path):
    c = load_config("tiny")
    c.model, c.model_dir = "unet2d", str(unet2d_folder[0])
    c.generations, c.metric, c.report_metrics = 1, "teacher_mse", ("teacher_mse",)
    c.baselines = ("uniform_w6a6", "greedy_bits")
    results = search_run.run_search(c, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["model"]["family"] == "unet2d" and saved["model"]["sample_shape"] == [8, 8, 3]
    assert saved["model"]["schedule"]["beta_schedule"] == "linear"
    assert saved["best"]["within_budget"] and saved["best"]["bitops"] <= saved["budget_bitops"]
    assert np.isfinite(saved["best"]["report"]["teacher_mse"]["value"])
    assert np.load(tmp_path / "samples_best.npz")["images"].shape == (c.final_samples, 8, 8, 3)
    assert results["model"]["macs_per_step"] > 0
