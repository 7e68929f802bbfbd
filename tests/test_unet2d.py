"""The Flax `UNet2D` port against diffusers' PyTorch `UNet2DModel`, the weights converter, and its quant sites."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from tmpq_jax import checkpoint, quant
from tmpq_jax.models import pretrained
from tmpq_jax.models.pretrained import WeightsError, read_torch_weights, torch_to_flax
from tmpq_jax.models.unet2d import (check_unet2d_config, config_to_static, example_inputs_unet2d, load_unet2d,
                                    unet2d_rename)

from cost_helpers import MATMUL_SCALES, mac_ratios

ST = "diffusion_pytorch_model.safetensors"

# every supported block type, mid attention, two heads of 8 per attention block
SMALL = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=16)
TINY = dict(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=8)
# google/ddpm-cifar10-32's config.json
DDPM_CIFAR10 = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
}
OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
# max|flax - torch| / max|torch| allowed: about 2.5x the largest error measured (jax 0.9.2, torch 2.13.0, 2-core CPU)
TOL = 2.5e-6  # SMALL/TINY configs, measured 5.1e-7 to 1.0e-6 (block types 9.5e-7, 6.8e-7; variants 5.1e-7 to
# 6.5e-7; old attention names 1.0e-6)
TOL_CIFAR10 = 4e-6  # the full ddpm-cifar10-32 config (slow), measured 1.82e-6 (1.69e-6 in an earlier run)


def torch_unet(seed=0, **config):
    """A diffusers PyTorch UNet2DModel with random weights, norms included (they start at 1 / 0)."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    return model


def save(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


def inputs(config, fourier=False, labels=None, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    s = config["sample_size"]
    x = rng.standard_normal((batch, config["in_channels"], s, s)).astype(np.float32)
    t = np.asarray([0.5, 20.0], np.float32)[:batch] if fourier else np.asarray([3, 700], np.int64)[:batch]
    return x, t, labels


def run(fn, *args):
    """jit with cheap XLA optimisation: these tiny models compile ~40% faster, results agree to ~1e-6."""
    opts = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(fn).lower(*args).compile(compiler_options=opts)(*args)


def parity(model, folder, x, t, labels=None):
    """max|flax - torch| / max|torch| of one forward (fp32, no grad)."""
    import torch

    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t),
                    None if labels is None else torch.from_numpy(labels)).sample.numpy()
    module, params, _ = load_unet2d(folder)
    out = run(module.apply, {"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
              None if labels is None else jnp.asarray(labels))
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert out.shape == ref.shape
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    print(f"relative error {err:.2e}")
    return err


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The SMALL config saved once (safetensors): (torch model, folder)."""
    model = torch_unet(**SMALL)
    return model, save(model, tmp_path_factory.mktemp("small"))


# --- parity -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift,padding,center", [("default", 1, False), ("scale_shift", 0, True)])
def test_parity_all_block_types(tmp_path, shift, padding, center):
    cfg = dict(SMALL, resnet_time_scale_shift=shift, downsample_padding=padding, center_input_sample=center)
    model = torch_unet(**cfg)
    assert parity(model, save(model, tmp_path), *inputs(cfg)) < TOL


@pytest.mark.parametrize("variant", [
    dict(time_embedding_type="fourier", act_fn="mish", attention_head_dim=None),
    dict(num_class_embeds=5, flip_sin_to_cos=False, freq_shift=1, act_fn="gelu", add_attention=False),
    dict(class_embed_type="timestep", attn_norm_num_groups=2, resnet_time_scale_shift="scale_shift",
         mid_block_scale_factor=2 ** -0.5, time_embedding_dim=24),
    dict(class_embed_type="identity", norm_eps=1e-6),
], ids=["fourier", "class-embeds", "class-timestep", "class-identity"])
def test_parity_variants(tmp_path, variant):
    cfg = dict(TINY, **variant)
    model = torch_unet(**cfg)
    labels = None
    if "num_class_embeds" in variant:
        labels = np.asarray([1, 4], np.int64)
    elif variant.get("class_embed_type") == "timestep":
        labels = np.asarray([5, 60], np.int64)
    elif variant.get("class_embed_type") == "identity":
        labels = np.random.default_rng(1).standard_normal((2, 4 * cfg["block_out_channels"][0])).astype(np.float32)
    x, t, _ = inputs(cfg, fourier=variant.get("time_embedding_type") == "fourier")
    assert parity(model, save(model, tmp_path), x, t, labels) < TOL


def with_old_attention_names(state: dict) -> dict:
    """The state dict as old diffusers checkpoints store attention (query/key/value/proj_attn)."""
    old = {}
    for k, v in state.items():
        for new, o in OLD_NAMES.items():
            k = k.replace(f".{new}.", f".{o}.")
        old[k] = v
    return old


def test_old_attention_names_and_scalar_timestep(small, tmp_path):
    model, folder = small
    old = with_old_attention_names(load_file(folder / ST))
    assert any(".proj_attn." in k for k in old) and not any(".to_q." in k for k in old)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file(old, str(tmp_path / ST))
    assert unet2d_rename("mid_block.attentions.0.proj_attn.weight") == "mid_block.attentions.0.to_out.0.weight"
    x, t, _ = inputs(SMALL, batch=1)
    assert parity(model, tmp_path, x, t) < TOL
    # a scalar timestep is broadcast over the batch, labels are ignored by an unconditional model
    module, params, cfg = load_unet2d(tmp_path)
    x2 = jnp.asarray(np.concatenate([x, x]).transpose(0, 2, 3, 1))
    a = run(lambda p, x: module.apply({"params": p}, x, 7), params, x2)
    b = run(lambda p, x: module.apply({"params": p}, x, jnp.asarray([7, 7]), jnp.asarray([0, 1])), params, x2)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_bin_sharded_and_msgpack_weights_load_the_same_params(small, tmp_path):
    model, folder = small
    _, ref, cfg = load_unet2d(folder)
    ref = flatten_dict(ref)
    # 1. a PyTorch pickle (needs torch)
    save(model, tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    # 2. two safetensors shards and an index
    shard = tmp_path / "sharded"
    shard.mkdir()
    shutil.copy(folder / "config.json", shard / "config.json")
    state = load_file(folder / ST)
    keys = sorted(state)
    parts = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in parts.items():
        save_file({k: state[k] for k in ks}, str(shard / name))
    (shard / f"{ST}.index.json").write_text(json.dumps({"weight_map": {k: n for n, ks in parts.items() for k in ks}}))
    # 3. the Flax msgpack written by checkpoint.save_tree
    mp = tmp_path / "msgpack"
    mp.mkdir()
    shutil.copy(folder / "config.json", mp / "config.json")
    checkpoint.save_tree(mp / "diffusion_flax_model.msgpack", load_unet2d(folder)[1])
    for d in (tmp_path / "bin", shard, mp):
        got = flatten_dict(load_unet2d(d)[1])
        assert got.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=f"{d.name}: {k}")


def test_half_precision_safetensors_read_as_float32(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    tensors = {"a.weight": torch.randn(3, 4).to(torch.bfloat16), "b.bias": torch.randn(5).half(),
               "c.index": torch.arange(4)}
    save_torch(tensors, str(tmp_path / ST))
    got = read_torch_weights(tmp_path)
    assert got["a.weight"].dtype == np.float32 and got["b.bias"].dtype == np.float32
    np.testing.assert_array_equal(got["a.weight"], tensors["a.weight"].float().numpy())
    np.testing.assert_array_equal(got["b.bias"], tensors["b.bias"].float().numpy())
    np.testing.assert_array_equal(got["c.index"], np.arange(4))


# --- converter ------------------------------------------------------------------------------------------------------


def test_torch_to_flax_layouts_without_torch():
    expected = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32),
                         "bias": jax.ShapeDtypeStruct((4,), jnp.float32)},
                "blocks_0": {"proj_in": {"kernel": jax.ShapeDtypeStruct((4, 6), jnp.float32)},
                             "norm": {"scale": jax.ShapeDtypeStruct((4,), jnp.float32)},
                             "fc": {"kernel": jax.ShapeDtypeStruct((4, 5), jnp.float32)},
                             "proj_out": {"kernel": jax.ShapeDtypeStruct((1, 1, 5, 4), jnp.float32)}},
                "emb": {"embedding": jax.ShapeDtypeStruct((7, 4), jnp.float32)}}
    rng = np.random.default_rng(0)
    state = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in {
        "conv.weight": rng.standard_normal((4, 2, 3, 3)), "conv.bias": rng.standard_normal(4),
             "blocks.0.proj_in.weight": rng.standard_normal((6, 4, 1, 1)).astype(np.float16),
             "blocks.0.norm.weight": rng.standard_normal(4), "blocks.0.fc.weight": rng.standard_normal((5, 4)),
        "blocks.0.proj_out.weight": rng.standard_normal((4, 5)),
             "emb.weight": rng.standard_normal((7, 4))}.items()}
    out = torch_to_flax(state, expected)
    np.testing.assert_array_equal(out["conv"]["kernel"], state["conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(out["blocks_0"]["proj_in"]["kernel"], state["blocks.0.proj_in.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(out["blocks_0"]["fc"]["kernel"], state["blocks.0.fc.weight"].T)
    np.testing.assert_array_equal(out["blocks_0"]["proj_out"]["kernel"][0, 0], state["blocks.0.proj_out.weight"].T)
    np.testing.assert_array_equal(out["emb"]["embedding"], state["emb.weight"])
    assert all(v.dtype == np.float32 for v in flatten_dict(out).values())


def test_error_lists_missing_unexpected_and_mis_shaped_tensors(small, tmp_path):
    _, folder = small
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = load_file(folder / ST)
    state["conv_inn.weight"] = state.pop("conv_in.weight")  # renamed
    del state["up_blocks.1.attentions.0.to_v.bias"]  # removed
    del state["time_embedding.linear_2.bias"]
    state["time_embedding.linear_1.weight"] = np.zeros((64, 17), np.float32)  # wrong shape (expects (64, 16))
    save_file(state, str(tmp_path / ST))
    with pytest.raises(WeightsError) as e:
        load_unet2d(tmp_path)
    msg = str(e.value)
    for s in ("conv_in.weight", "conv_inn.weight", "up_blocks.1.attentions.0.to_v.bias", "time_embedding.linear_2.bias",
              "time_embedding.linear_1.weight", "(64, 17)", "expects (64, 16)", "3 missing", "1 unexpected",
              "1 shape mismatches", str(tmp_path / ST)):
        assert s in msg, (s, msg)


def test_folder_errors(small, tmp_path):
    _, folder = small
    with pytest.raises(WeightsError, match="does not exist.*huggingface-cli download"):
        load_unet2d(tmp_path / "nope")
    with pytest.raises(WeightsError, match="config.json"):
        load_unet2d(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_unet2d(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(WeightsError, match="AutoencoderKL.*not a UNet2DModel"):
        load_unet2d(tmp_path)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightsError, match=r"no weights file.*diffusion_pytorch_model\.safetensors.*\.bin"):
        load_unet2d(tmp_path)
    (tmp_path / ST).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(WeightsError, match=ST + ".*corrupt"):
        load_unet2d(tmp_path)


@pytest.mark.parametrize("change,needles", [
    (dict(down_block_types=["SkipDownBlock2D", "AttnDownBlock2D"]), ["down_block_types[0]", "SkipDownBlock2D",
                                                                     "AttnDownBlock2D"]),
    (dict(up_block_types=["AttnUpBlock2D", "CrossAttnUpBlock2D"]), ["up_block_types[1]", "CrossAttnUpBlock2D"]),
    (dict(frobnicate=3), ["unknown field 'frobnicate'"]),
    (dict(class_embed_type="projection"), ["class_embed_type", "projection", "identity"]),
    (dict(resnet_time_scale_shift="ada_group"), ["resnet_time_scale_shift", "ada_group", "scale_shift"]),
    (dict(time_embedding_type="learned"), ["time_embedding_type", "learned", "fourier"]),
    (dict(downsample_type="resnet"), ["downsample_type", "resnet", "conv"]),
    (dict(act_fn="tanh"), ["act_fn", "tanh", "silu"]),
    (dict(norm_num_groups=3), ["norm_num_groups", "3"]),
    (dict(attention_head_dim=64), ["attention_head_dim", "64"]),
    (dict(block_out_channels=[8, 16, 16]), ["block_out_channels", "must match"]),
    (dict(time_embedding_act_fn="silu"), ["time_embedding_act_fn", "silu"]),
])
def test_config_errors_name_the_field(change, needles):
    with pytest.raises(ValueError) as e:
        check_unet2d_config({**TINY, **change})
    for s in needles:
        assert s in str(e.value), (s, str(e.value))


def test_config_defaults_and_static_form():
    cfg = check_unet2d_config({"_class_name": "UNet2DModel", "_diffusers_version": "0.39.0", **TINY,
                               "time_embedding_act_fn": None})
    assert cfg["resnet_time_scale_shift"] == "default" and cfg["norm_eps"] == 1e-5 and cfg["freq_shift"] == 0
    assert cfg["block_out_channels"] == [8, 16] and "_class_name" not in cfg and "time_embedding_act_fn" not in cfg
    static = config_to_static(cfg)
    hash(static)
    assert dict(static)["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D")
    assert check_unet2d_config(dict(static)) == cfg


# --- quantization sites -------------------------------------------------------------------------------------------


def test_sites_cover_every_conv_dense_and_attention_product():
    cfg = check_unet2d_config(dict(SMALL, sample_size=32))
    from tmpq_jax.models.unet2d import UNet2D

    module = UNet2D(config_to_static(cfg))
    ex = example_inputs_unet2d(cfg)
    shapes = jax.eval_shape(module.init, jax.random.key(0), *ex)["params"]
    apply = lambda p, *a: module.apply({"params": p}, *a)  # noqa: E731
    sites = quant.discover_sites(apply, shapes, ex)
    kernels = {"/".join(k[:-1]): len(v.shape) for k, v in flatten_dict(shapes).items() if k[-1] == "kernel"}
    by_path = {s.path: s for s in sites.sites}
    assert {p: {4: "conv", 2: "dense"}[n] for p, n in kernels.items()} == \
        {p: s.kind for p, s in by_path.items() if s.kind != "matmul"}
    attns = sorted({"/".join(k[:-2]) for k in flatten_dict(shapes) if k[-2] == "to_q"})
    assert attns == ["down_blocks_1/attentions_0", "mid_block/attentions_0", "up_blocks_1/attentions_0",
                     "up_blocks_1/attentions_1"]
    matmuls = sorted(s.path for s in sites.sites if s.kind == "matmul")
    assert matmuls == sorted(f"{a}/{p}" for a in attns for p in ("qk", "av"))
    # 2 heads of 16 at 16x16 (down 1, up 1) and at 8x8 (mid): heads * T * T * dim_head
    assert by_path["down_blocks_1/attentions_0/qk"].macs == 2 * 256 * 256 * 16
    assert by_path["mid_block/attentions_0/av"].macs == 2 * 64 * 64 * 16
    # 2 x MACs vs XLA's flop count of the whole forward (see tests/test_quant.py for the known differences):
    # measured 1.0109 (jax 0.9.2 CPU); the attention matmuls are 16.6% of the MACs here, so any miscount of them
    # (dropped 0.844, doubled 1.178, one of qk/av lost 0.927) falls outside the bound
    ratios = mac_ratios(apply, shapes, ex, sites)
    print("MAC ratio by matmul scale", ratios)
    assert abs(ratios[1.0] - 1.011) < 0.02, ratios
    for scale in MATMUL_SCALES:
        assert abs(ratios[scale] - 1.011) > 0.02, (scale, ratios)


def test_quantized_apply_at_16_bits_matches_fp(small):
    """The engine's hooked attention path equals the plain forward when every operand passes through."""
    _, folder = small
    module, params, cfg = load_unet2d(folder)
    apply = lambda p, *a: module.apply({"params": p}, *a)  # noqa: E731
    ex = example_inputs_unet2d(cfg)
    sites = quant.discover_sites(apply, jax.eval_shape(lambda: params), ex, rules=())

    def identity(path, role, x):
        assert path in sites.paths, path
        return x

    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    from flax import linen as nn

    from tmpq_jax.quant.sites import make_interceptor

    def hooked(p, x):
        with nn.intercept_methods(make_interceptor(identity)):
            return apply(p, x, jnp.asarray([5, 50]), jnp.asarray([0, 0]))

    np.testing.assert_allclose(np.asarray(run(hooked, params, x)),
                               np.asarray(run(lambda p, x: apply(p, x, jnp.asarray([5, 50])), params, x)),
                               rtol=1e-6, atol=1e-6)


# --- the real DDPM CIFAR-10 architecture --------------------------------------------------------------------------


@pytest.mark.slow
def test_parity_ddpm_cifar10_32_config(tmp_path):
    """google/ddpm-cifar10-32's config (35.7M params, one head of full width, padding 0) with its old attention
    names, from its own (partial) config.json."""
    cfg = {k: v for k, v in DDPM_CIFAR10.items() if not k.startswith("_")}
    model = torch_unet(**cfg)
    save(model, tmp_path)
    old = with_old_attention_names(load_file(tmp_path / ST))
    save_file(old, str(tmp_path / ST))
    (tmp_path / "config.json").write_text(json.dumps(DDPM_CIFAR10))
    x, t, _ = inputs(cfg)
    assert parity(model, tmp_path, x, t) < TOL_CIFAR10
    _, params, _ = load_unet2d(tmp_path)
    assert 35e6 < sum(v.size for v in jax.tree.leaves(params)) < 36e6


def test_pretrained_module_api():
    assert pretrained.flax_path("down_blocks.0.resnets.1.conv1") == ("down_blocks_0", "resnets_1", "conv1")
    assert pretrained.flax_path("up_blocks.1.attentions.0.to_out.0") == ("up_blocks_1", "attentions_0", "to_out_0")
    assert pretrained.torch_name("up_blocks_1/attentions_0/to_out_0/kernel") == \
        "up_blocks.1.attentions.0.to_out.0.weight"
    assert pretrained.torch_name("time_embedding/linear_1/bias") == "time_embedding.linear_1.bias"
    assert pretrained.torch_name("mid_block/resnets_1/norm1/scale") == "mid_block.resnets.1.norm1.weight"
    assert pretrained.torch_name("blocks_0/x/kernel", {"blocks_0"}) == "blocks_0.x.weight"
    assert issubclass(WeightsError, checkpoint.CheckpointError)
