"""The `sd` family (Stable Diffusion in diffusers' Flax classes) against diffusers' PyTorch UNet2DConditionModel and
AutoencoderKL on a tiny random pipeline folder: parity, guidance, attention variants, loading errors, round trip."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

import tmpq_jax.models.sd as sd
from tmpq_jax import models
from tmpq_jax.models.pretrained import WeightsError

from sd_helpers import save_tiny_sd

torch = pytest.importorskip("torch")

P = 3  # prompts
L = 77  # context length
ST = "diffusion_pytorch_model.safetensors"
# max|a - b| / max|b| allowed: about 2.5x the largest error measured (jax 0.9.2, torch 2.13.0, 2-core CPU)
# UNet, measured 5.9e-5 (linear projection, per-block heads: 5.2e-5). Most of it is diffusers' Flax GEGLU, which uses
# the tanh-approximate GELU where PyTorch's is exact: the exact GELU took it from 4.3e-5 to 5.1e-6 on similar inputs
UNET_TOL = 1.5e-4
VAE_TOL = 3e-6  # decoder, measured 1.1e-6

# stable-diffusion-v1-5's unet/config.json and stabilityai/stable-diffusion-2-1's (keys as published)
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET = {**SD15_UNET, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
             "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
             "only_cross_attention": False, "resnet_time_scale_shift": "default", "sample_size": 96,
             "upcast_attention": True, "use_linear_projection": True}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, torch modules) of the tiny pipeline."""
    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    return path, save_tiny_sd(path)


@pytest.fixture(scope="module")
def loaded(tiny):
    """The tiny pipeline loaded with P prompts (tables filled with random embeddings), a jitted forward, inputs."""
    path, mods = tiny
    model, params, spec = models.from_pretrained(path, family="sd", num_classes=P)
    rng = np.random.default_rng(0)
    params = {**params, "prompt_embeds": jnp.asarray(rng.standard_normal((P, L, 16)), jnp.float32),
              "negative_embeds": jnp.asarray(rng.standard_normal((P, L, 16)), jnp.float32)}
    x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    t = np.array([1, 421, 999], np.int32)
    idx = np.array([2, 0, 1], np.int32)
    fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    return dict(path=path, mods=mods, model=model, params=params, spec=spec, x=x, t=t, idx=idx, fwd=fwd,
                out=np.asarray(fwd(params, x, t, idx)))


def torch_unet_out(unet, x, t, emb):
    with torch.no_grad():
        out = unet(torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2), torch.from_numpy(np.asarray(t)).long(),
                   torch.from_numpy(np.asarray(emb))).sample
    return out.permute(0, 2, 3, 1).numpy()


# --- folder and spec ----------------------------------------------------------------------------------------------


def test_spec_from_configs(tiny):
    path, _ = tiny
    assert sd.detect_sd(path) and models.detect_family(path).name == "sd"
    spec = models.read_spec(path)
    assert (spec.family, spec.conditioning, spec.num_classes, spec.source) == ("sd", "text", 0, str(path))
    assert spec.name == "sd:tiny-sd" and spec.sample_shape == (8, 8, 4) and spec.image_shape == (16, 16, 3)
    assert spec.cross_attention_dim == 16 and spec.unet["attention_head_dim"] == 4
    assert spec.unet["block_out_channels"] == (32, 64) and "norm_num_groups" not in spec.unet
    assert spec.decoder["scaling_factor"] == pytest.approx(0.18215)
    assert spec.decoder["config"]["norm_num_groups"] == 4
    assert spec.attention == {"use_memory_efficient_attention": False, "split_head_dim": False}
    assert spec.schedule.beta_schedule == "scaled_linear" and spec.schedule.steps_offset == 1
    assert spec.schedule.prediction_type == "epsilon" and spec.unet_passes_per_step == 1
    json.dumps(spec.describe())


def test_v_prediction_folder(tmp_path):
    save_tiny_sd(tmp_path, prediction_type="v_prediction")
    assert models.read_spec(tmp_path).schedule.prediction_type == "v_prediction"


def test_published_sd_configs_accepted():
    cfg15 = sd.check_sd_unet_config(SD15_UNET)
    assert cfg15["attention_head_dim"] == 8 and cfg15["use_linear_projection"] is False
    assert cfg15["sample_size"] == 64 and cfg15["cross_attention_dim"] == 768
    cfg21 = sd.check_sd_unet_config(SD21_UNET)
    assert cfg21["attention_head_dim"] == (5, 10, 20, 20) and cfg21["use_linear_projection"] is True
    assert "upcast_attention" not in cfg21
    # num_attention_heads is what the Flax class reads from attention_head_dim
    cfg = sd.check_sd_unet_config({**SD15_UNET, "attention_head_dim": 64, "num_attention_heads": 5})
    assert cfg["attention_head_dim"] == 5 and "num_attention_heads" not in cfg


@pytest.mark.parametrize("field,value", [
    ("addition_embed_type", "text_time"), ("class_embed_type", "timestep"), ("encoder_hid_dim", 768),
    ("time_cond_proj_dim", 256), ("num_class_embeds", 10), ("resnet_time_scale_shift", "scale_shift"),
    ("act_fn", "gelu"), ("conv_in_kernel", 5), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("norm_num_groups", 16), ("only_cross_attention", True), ("no_such_key", 1),
])
def test_unsupported_unet_field_named(tiny, tmp_path, field, value):
    path = tmp_path / "sd"
    shutil.copytree(tiny[0], path)
    f = path / "unet" / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), field: value}))
    with pytest.raises(ValueError, match=field) as e:
        models.read_spec(path)
    assert repr(value) in str(e.value) or field == "no_such_key"
    assert str(f) in str(e.value)


def test_unknown_beta_schedule_named(tiny, tmp_path):
    path = tmp_path / "sd"
    shutil.copytree(tiny[0], path)
    f = path / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "beta_schedule": "sigmoid"}))
    with pytest.raises(ValueError, match="sigmoid"):
        models.read_spec(path, family="sd")


def test_missing_vae_folder_named(tiny, tmp_path):
    path = tmp_path / "sd"
    shutil.copytree(tiny[0], path)
    shutil.rmtree(path / "vae")
    with pytest.raises(FileNotFoundError, match=r"vae/") as e:
        models.from_pretrained(path, family="sd")
    assert "huggingface-cli download" in str(e.value) and "Nothing is downloaded" in str(e.value)


# --- weights ------------------------------------------------------------------------------------------------------


def test_unet_tensor_removed_named(tiny, tmp_path):
    path = tmp_path / "sd"
    shutil.copytree(tiny[0], path)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    state = load_file(path / "unet" / ST)
    del state[key]
    save_file(state, path / "unet" / ST)
    with pytest.raises(WeightsError, match="1 missing") as e:
        models.from_pretrained(path, family="sd")
    assert key in str(e.value) and "unexpected" not in str(e.value)


def test_unet_tensor_renamed_named(tiny, tmp_path):
    path = tmp_path / "sd"
    shutil.copytree(tiny[0], path)
    state = load_file(path / "unet" / ST)
    state["mid_block.resnets.1.conv_one.weight"] = state.pop("mid_block.resnets.1.conv1.weight")
    save_file(state, path / "unet" / ST)
    with pytest.raises(WeightsError) as e:
        models.from_pretrained(path, family="sd")
    msg = str(e.value)
    assert "1 missing" in msg and "mid_block.resnets.1.conv1.weight" in msg
    assert "1 unexpected" in msg and "mid_block.resnets.1.conv_one.weight" in msg


def test_params_come_from_eval_shape(tiny, monkeypatch):
    """`from_pretrained` never initialises the model for real: its `init` only ever sees tracers."""
    calls = []
    init = sd.TextToImageUNet.init

    def spy(self, rngs, *args, **kwargs):
        calls.append(isinstance(rngs, jax.core.Tracer))
        return init(self, rngs, *args, **kwargs)

    monkeypatch.setattr(sd.TextToImageUNet, "init", spy)
    _, params, _ = models.from_pretrained(tiny[0], family="sd", num_classes=2)
    assert calls and all(calls)
    assert set(params) == {"unet", "vae", "prompt_embeds", "negative_embeds"}
    assert params["prompt_embeds"].shape == (2, L, 16) and not np.any(np.asarray(params["negative_embeds"]))
    assert set(params["vae"]) == {"decoder", "post_quant_conv"}  # the encoder half is not loaded


def test_vae_rename():
    assert sd.vae_rename("decoder.mid_block.attentions.0.to_out.0.weight") == \
        "decoder.mid_block.attentions.0.proj_attn.weight"
    assert sd.vae_rename("decoder.mid_block.attentions.0.to_q.bias") == "decoder.mid_block.attentions.0.query.bias"
    assert sd.vae_rename("decoder.mid_block.attentions.0.query.bias") == "decoder.mid_block.attentions.0.query.bias"
    assert sd.vae_rename("decoder.up_blocks.0.resnets.0.conv1.weight") == "decoder.up_blocks.0.resnets.0.conv1.weight"


# --- numerics -----------------------------------------------------------------------------------------------------


def test_unet_parity_with_pytorch(loaded):
    """Guidance 1: the output is the conditional PyTorch UNet's on each sample's prompt, whatever the negatives."""
    d = loaded
    ref = torch_unet_out(d["mods"]["unet"], d["x"], d["t"], np.asarray(d["params"]["prompt_embeds"])[d["idx"]])
    err = rel_err(d["out"], ref)
    print(f"UNet parity rel err {err:.2e}")
    assert err < UNET_TOL
    other = {**d["params"], "negative_embeds": d["params"]["negative_embeds"] * 3.0 + 1.0}
    np.testing.assert_array_equal(np.asarray(d["fwd"](other, d["x"], d["t"], d["idx"])), d["out"])


def test_decode_parity_with_pytorch(loaded):
    d = loaded
    z = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32) * 0.18215
    dec = jax.jit(lambda p, z: (d["model"].apply({"params": p}, z, False, method="decode"),
                                d["model"].apply({"params": p}, z, method="decode")))
    img, clipped = map(np.asarray, dec(d["params"], z))
    with torch.no_grad():
        ref = d["mods"]["vae"].decode(torch.from_numpy(z).permute(0, 3, 1, 2) / 0.18215).sample
    ref = ref.permute(0, 2, 3, 1).numpy()
    err = rel_err(img, ref)
    print(f"VAE decode parity rel err {err:.2e}")
    assert img.shape == (2, *d["spec"].image_shape) and err < VAE_TOL
    assert np.abs(img).max() > 1  # clipping is exercised
    np.testing.assert_allclose(clipped, np.clip(img, -1, 1), atol=1e-5)


def test_classifier_free_guidance(loaded):
    """Scale 7.5: one 2B pass equals u + 7.5 (c - u) from two separate conditional passes."""
    d = loaded
    spec = dataclasses.replace(d["spec"], guidance_scale=7.5)
    assert spec.unet_passes_per_step == 2
    model = models.build_model(spec)
    out = np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(d["params"], d["x"], d["t"], d["idx"]))
    c = d["out"]
    u = np.asarray(d["fwd"]({**d["params"], "prompt_embeds": d["params"]["negative_embeds"]}, d["x"], d["t"],
                            d["idx"]))
    want = u + 7.5 * (c - u)
    assert rel_err(out, want) < 1e-5
    assert rel_err(out, c) > 1e-2  # guidance changed something


def test_memory_efficient_attention_same_output(loaded):
    d = loaded
    model, params, spec = models.from_pretrained(
        d["path"], family="sd", num_classes=P,
        attention={"use_memory_efficient_attention": True, "split_head_dim": False})
    assert model.use_memory_efficient_attention and spec.attention["use_memory_efficient_attention"]
    params = {**params, "prompt_embeds": d["params"]["prompt_embeds"]}
    out = np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, d["x"], d["t"], d["idx"]))
    assert rel_err(out, d["out"]) < 1e-5


def test_scalar_timestep_and_shapes(loaded):
    d = loaded
    out = jax.eval_shape(lambda p: d["model"].apply({"params": p}, d["x"], 500, d["idx"]), d["params"])
    assert out.shape == d["x"].shape
    assert sd.sd_inputs(d["spec"], 2)[0].shape == (2, 8, 8, 4)


def test_save_sd_round_trip(loaded, tmp_path):
    d = loaded
    src = tmp_path / "src"
    shutil.copytree(d["path"], src)
    (src / "text_encoder").mkdir()
    (src / "text_encoder" / "config.json").write_text("{}")
    (src / "tokenizer").mkdir()
    (src / "tokenizer" / "vocab.json").write_text("{}")
    out = tmp_path / "converted"
    spec = models.convert_folder(src, out, family="sd")
    assert spec.family == "sd"
    for rel in ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                "unet/diffusion_flax_model.msgpack", "vae/diffusion_flax_model.msgpack", "text_encoder/config.json",
                "tokenizer/vocab.json"):
        assert (out / rel).is_file(), rel
    assert not list(out.rglob("*.safetensors"))
    _, a, _ = models.from_pretrained(src, family="sd", num_classes=P)
    _, b, spec_b = models.from_pretrained(out, num_classes=P)
    assert spec_b.family == "sd" and spec_b.image_shape == d["spec"].image_shape
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def test_converted_msgpack_mismatch_named(loaded, tmp_path):
    """A converted folder whose msgpack does not fit the config names the leaf."""
    d = loaded
    out = tmp_path / "converted"
    models.convert_folder(d["path"], out, family="sd")
    f = out / "unet" / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "cross_attention_dim": 24}))
    with pytest.raises(WeightsError, match="attn2/to_k/kernel"):
        models.from_pretrained(out, family="sd")


@pytest.mark.slow
def test_linear_projection_and_per_block_heads_parity(tmp_path):
    """SD 2.x style: Linear proj_in/proj_out and one head count per block; split_head_dim attention."""
    mods = save_tiny_sd(tmp_path, unet_overrides=dict(use_linear_projection=True, attention_head_dim=(2, 4),
                                                      upcast_attention=True))
    model, params, spec = models.from_pretrained(tmp_path, family="sd", num_classes=1)
    assert spec.unet["attention_head_dim"] == (2, 4) and spec.unet["use_linear_projection"]
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((1, L, 16)).astype(np.float32)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([3, 700], np.int32)
    out = model.apply({"params": {**params, "prompt_embeds": jnp.asarray(emb)}}, x, t, np.zeros(2, np.int32))
    err = rel_err(out, torch_unet_out(mods["unet"], x, t, np.repeat(emb, 2, axis=0)))
    print(f"linear-projection UNet parity rel err {err:.2e}")
    assert err < UNET_TOL
    # split_head_dim (an einsum layout of the same attention) gives the same output
    split = models.build_model(dataclasses.replace(spec, attention={"use_memory_efficient_attention": False,
                                                                    "split_head_dim": True}))
    out2 = split.apply({"params": {**params, "prompt_embeds": jnp.asarray(emb)}}, x, t, np.zeros(2, np.int32))
    assert rel_err(out2, out) < 1e-5
