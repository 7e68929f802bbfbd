"""A quantized checkpoint's weights, dequantized (codes x scales), as a diffusers folder with PyTorch names, so the
weight quantization can be inspected in diffusers' own PyTorch pipelines. Activations are not quantized there: the
folder reproduces the weights only (`tmpq_quantization.json` says so and lists the bit map).

Layouts:
- `unet2d`: `config.json`, `diffusion_pytorch_model.safetensors`, `scheduler_config.json` (a UNet2DModel folder);
- `sd`: the source pipeline with `unet/` replaced (VAE, text encoder, tokenizer and scheduler copied unchanged);
- `conditional` (the embedded MNIST models): `unet/` (a UNet2DConditionModel), `scheduler/`, and
  `label_embedding.safetensors`, the class-label table whose row y is the one cross-attention token of label y.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tmpq_jax.deploy.quantized import QuantizedCheckpoint
from tmpq_jax.models import pretrained

UNET_FILE = "diffusion_pytorch_model.safetensors"
TORCH_CLASSES = {"unet2d": "UNet2DModel", "sd": "UNet2DConditionModel", "conditional": "UNet2DConditionModel"}


def _torch_shapes_from_file(folder: Path) -> dict | None:
    """{name: shape} from a component's safetensors header (no tensor read), or None without one."""
    try:
        path = pretrained.locate_torch_weights(folder)
    except pretrained.WeightsError:
        return None
    if not path.name.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def _torch_shapes_from_config(class_name: str, config: dict) -> dict:
    """{name: shape} of the diffusers PyTorch class built from `config` (needs torch: pip install -e '.[text]')."""
    try:
        import diffusers
        import torch  # noqa: F401
    except ImportError as e:
        raise ImportError(f"writing a diffusers folder for this model needs PyTorch to learn {class_name}'s "
                          "parameter names: pip install -e '.[text]'") from e
    cls = getattr(diffusers, class_name)
    model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _write_component(out: Path, params, shapes: dict, config: dict, class_name: str, rename=None) -> None:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = pretrained.flax_to_torch(params, shapes, rename=rename, where=str(out))
    save_file(state, str(out / UNET_FILE), metadata={"format": "pt"})
    cfg = {"_class_name": class_name, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()
                                        if not k.startswith("_")}}
    (out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")


def _scheduler_config(ckpt: QuantizedCheckpoint) -> dict:
    return {"_class_name": "DDIMScheduler", **ckpt.spec.schedule.to_dict()}


def export_diffusers(ckpt: QuantizedCheckpoint, out_dir: str | Path) -> Path:
    """Write the dequantized weights of `ckpt` as a diffusers folder (see the module docstring)."""
    from safetensors.numpy import save_file

    spec, out = ckpt.spec, Path(out_dir)
    family = spec.family
    if family not in TORCH_CLASSES:
        raise ValueError(f"model family {family!r} has no diffusers layout here; valid: {sorted(TORCH_CLASSES)}")
    params = ckpt.dequantized_params()
    source = Path(spec.source) if spec.source else None
    cls = TORCH_CLASSES[family]
    if family == "unet2d":
        from tmpq_jax.models.folders import unet2d_dir
        from tmpq_jax.models.unet2d import unet2d_rename

        src = unet2d_dir(source) if source is not None and source.is_dir() else None
        shapes = (_torch_shapes_from_file(src) if src is not None else None) or \
            _torch_shapes_from_config(cls, dict(spec.unet))
        cfg = json.loads((src / "config.json").read_text()) if src is not None else dict(spec.unet)
        _write_component(out, params, shapes, cfg, cls, rename=unet2d_rename)
        (out / "scheduler_config.json").write_text(json.dumps(_scheduler_config(ckpt), indent=1) + "\n")
    elif family == "sd":
        if source is None or not source.is_dir():
            raise FileNotFoundError(f"the SD source pipeline {spec.source!r} (its VAE, text encoder, tokenizer and "
                                    "scheduler are copied unchanged) is not on this machine")
        out.mkdir(parents=True, exist_ok=True)
        for item in source.iterdir():
            if item.name == "unet":
                continue
            dest = out / item.name
            if item.is_dir():
                shutil.copytree(item, dest, dirs_exist_ok=True)
            else:
                shutil.copy2(item, dest)
        shapes = _torch_shapes_from_file(source / "unet") or _torch_shapes_from_config(cls, dict(spec.unet))
        src_cfg = json.loads((source / "unet" / "config.json").read_text())
        _write_component(out / "unet", params["unet"], shapes, src_cfg, cls)
    else:  # conditional: the embedded class-conditional models
        _write_component(out / "unet", params["unet"], _torch_shapes_from_config(cls, dict(spec.unet)),
                         dict(spec.unet), cls)
        save_file({"label_embedding": np.ascontiguousarray(params["label_embedding"]["embedding"], np.float32)},
                  str(out / "label_embedding.safetensors"))
        (out / "scheduler").mkdir(exist_ok=True)
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(_scheduler_config(ckpt), indent=1))
    info = {"note": "weights are the quantized checkpoint's codes x scales (float32); activations are not quantized "
                    "in this folder; sample with the timesteps below (DDIM, eta 0) to match the search",
            "source_checkpoint": str(ckpt.path), "candidate": ckpt.config.get("candidate"),
            "timesteps": ckpt.timesteps.tolist(), "bitops": ckpt.config["bitops"],
            "bits": {s["path"]: [s["w_bits"], s["a_bits"]] for s in ckpt.config["sites"]}}
    if family == "conditional":
        info["conditioning"] = ("encoder_hidden_states = label_embedding[y][:, None, :] (one token); y = "
                                f"{spec.num_classes} is the unconditional label")
    (out / "tmpq_quantization.json").write_text(json.dumps(info, indent=1) + "\n")
    return out
