"""Keys of the artefacts a search caches in its workdir (calibration tables, FP teachers, evaluated samples).

One function, `cache_key`, builds every key from the settings that define the artefact's content: the model's
weights digest, the settings that change the model function (guidance, negative prompt, attention path, matmul
precision), and those of the artefact itself (`CACHE_SETTINGS`). A cached file is reused only if its stored key
equals the key of the current config, so a reused workdir under another setting recomputes instead of reading stale
data.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tmpq_jax.cpu_flags import backend_opt_level

# settings that change what the UNet computes for a given input (model, conditioning, numerics); the weights and a
# folder's configs and prompts are in the model digest (`run.model_sha`)
MODEL_FUNCTION = ("model", "guidance_scale", "negative_prompt", "memory_efficient_attention",
                  "split_head_dim", "matmul_precision")
# the quantization sites and their calibrated parameters
_TABLES = ("calib_steps", "calib_samples", "calib_batch", "seed", "bit_choices", "rules", "probs_8bit",
           "first_last_bits",
           "calib_trajectories", "calib_schedules", "calib_ranges", "act_range_norm", "unclipped_sites",
           "unclipped_min_bits", "num_steps", "spacing",
           "group_starts",
           "split_skip", "reconstruct", "recon_samples", "recon_iters", "recon_batch", "recon_lr_round",
           "recon_lr_act", "recon_reg", "recon_warmup")
CACHE_SETTINGS: dict[str, tuple[str, ...]] = {
    "tables": MODEL_FUNCTION + _TABLES,
    # the FP reference sampler's images (a batch size can change float rounding, so it is part of the key)
    "teacher": MODEL_FUNCTION + ("reference_steps", "sample_batch"),
    # a quantized candidate's images: its tables, and the population strategy (rounding flips between strategies)
    "samples": MODEL_FUNCTION + _TABLES + ("sample_batch", "strategy", "chunk_size"),
}


def _plain(value: Any) -> Any:
    """JSON-ready value of a config entry (ConfigDicts, tuples and numpy scalars included)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return json.loads(json.dumps(value, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))


def cache_key(kind: str, config, model_sha256: str, **content) -> dict:
    """The key of a `kind` artefact ('tables', 'teacher', 'samples'): the model digest, the config settings of
    `CACHE_SETTINGS[kind]` (missing ones read as None), XLA's LLVM level (`cpu_flags`) and the artefact's own
    `content` (e.g. its noise set and candidate)."""
    if kind not in CACHE_SETTINGS:
        raise ValueError(f"unknown cache kind {kind!r}; valid: {sorted(CACHE_SETTINGS)}")
    key = {"kind": kind, "model_sha256": model_sha256, "xla_backend_optimization_level": backend_opt_level()}
    key.update({name: _plain(config.get(name, None)) for name in CACHE_SETTINGS[kind]})
    key.update({name: _plain(v) for name, v in content.items()})
    return key


def cache_tag(key: dict) -> str:
    """A short digest of a key, for file names."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def key_diff(old: dict | None, new: dict) -> list[str]:
    """The entries in which a stored key differs from the current one (all of them if none is stored)."""
    if not isinstance(old, dict):
        return sorted(new)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
