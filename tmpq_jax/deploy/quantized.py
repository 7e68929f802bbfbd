"""The quantized checkpoint: `model.safetensors` (integer weight codes, scales, activation quantizers, the other
parameters in f32) and `quant_config.json` (model, sampler, timesteps, per-site bit-widths, numerics).

Tensors of `model.safetensors`:
- `param/<flax path>`: every parameter that is not a quantized kernel (norms, biases, embeddings, kernels of sites
  at >= 16 bits, a latent model's VAE, a text model's prompt tables), float32;
- `quant/<site>/w_codes` (uint32, `deploy.packing`: floor(32 / b) codes per word) and `quant/<site>/w_scale` (f32,
  per output channel) for each Conv/Dense site below 16 weight bits: kernel = codes * scale exactly;
- `quant/<site>/{a,skip,w}_{range,scale,zero_point}` (G, 2) / (G,) / (G,) f32, one row per timestep group, for the
  activation operand, the skip part of a split input, and the second operand of an attention product.

The safetensors metadata holds the format, its version and sha256 digests of the config and of the site bit map,
so a file written by another version, a changed bit map or a changed config is refused by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from tmpq_jax import models, quant
from tmpq_jax.deploy.packing import pack_codes, unpack_codes
from tmpq_jax.quant.engine import CandidateQuant, bitops, fp_bitops, kernel_codes
from tmpq_jax.quant.fake_quant import PASSTHROUGH_BITS, asymmetric_params
from tmpq_jax.quant.sites import Site, SiteTable, kernel_key

FORMAT = "tmpq-jax-quantized"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quant_config.json"
OPERANDS = ("a", "skip", "w")  # activation, skip part of a split input, second operand of an attention product

NUMERICS = {
    "weights": "symmetric signed, per output channel (the kernel's last axis): qmax = 2^(b-1) - 1, "
               "scale = max(clip, float32 tiny) / qmax, code = clip(round_half_even(w / scale), -qmax, qmax), or "
               "floor(w / scale) + learned rounding bit (AdaRound); kernel = code * scale in float32",
    "activations": "asymmetric unsigned, per tensor, one range per timestep group: lo' = min(lo, 0), "
                   "hi' = max(hi, 0), levels = 2^b - 1, scale = max(hi' - lo', float32 eps) / levels, "
                   "zero_point = round_half_even(-lo' / scale), q = clip(round_half_even(x / scale) + zero_point, 0, "
                   "levels), x_hat = (q - zero_point) * scale (float32); the stored scale and zero_point are these",
    "split_inputs": "a site with split_at > 0 quantizes input channels [0, split_at) with the 'a' quantizer and the "
                    "rest (the skip connection) with the 'skip' quantizer",
    "attention": "qk: a = queries, w = keys; av: a = softmax probabilities, w = values; both operands use the "
                 "asymmetric activation quantizer",
    "timestep_groups": "a UNet call at timestep t uses group g = the last g with group_starts[g] <= t (0 below)",
    "passthrough": f"bit-widths >= {PASSTHROUGH_BITS} are not quantized (float32)",
    "packing": "code + 2^(b-1) in b bits, floor(32 / b) codes per uint32 word, first code in the lowest bits, C order "
               "of the flattened kernel, no code straddles a word; the last word is zero-padded",
}


class FormatError(ValueError):
    """A quantized checkpoint that cannot be read: wrong format or version, tampered, truncated or incomplete."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


def _bits_map(config: dict) -> list:
    return [[s["path"], s["w_bits"], s["a_bits"]] for s in config["sites"]]


def _np(x, dtype=np.float32) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype))


def _quantizer_tensors(prefix: str, ranges: np.ndarray, bits: int) -> dict[str, np.ndarray]:
    """(G, 2) ranges -> the range, scale and zero point of each group (`asymmetric_params`)."""
    scale, zero_point, _ = asymmetric_params(jnp.asarray(ranges[:, 0]), jnp.asarray(ranges[:, 1]), jnp.int32(bits))
    return {f"{prefix}_range": _np(ranges), f"{prefix}_scale": _np(scale), f"{prefix}_zero_point": _np(zero_point)}


def site_operands(site: Site, w_bits: int, a_bits: int) -> tuple[str, ...]:
    """Which activation quantizers a site stores: 'a' (and 'skip' for a split input) below 16 activation bits, 'w'
    for an attention product below 16 bits of its second operand."""
    out = []
    if a_bits < PASSTHROUGH_BITS:
        out += ["a"] + (["skip"] if site.split_at else [])
    if not site.has_weights and w_bits < PASSTHROUGH_BITS:
        out.append("w")
    return tuple(out)


def export_quantized(out_dir: str | Path, spec: models.ModelSpec, params: Any, sites: SiteTable,
                     cand: CandidateQuant, timesteps, *, name: str, source_sha256: str, extra: dict | None = None
                     ) -> Path:
    """Write DIR/model.safetensors and DIR/quant_config.json for one candidate (`cand`: its gathered table rows,
    pinned bits resolved, as `quant.gather_candidate` returns). The codes are `engine.kernel_codes`, the function
    the simulation's `quantize_kernel` multiplies back, so codes x scale equal the simulated kernels exactly."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = flatten_dict(flax.core.unfreeze(params))
    w_bits, a_bits = np.asarray(cand.w_bits, np.int64), np.asarray(cand.a_bits, np.int64)
    ranges = {"a": np.asarray(cand.a_range), "skip": np.asarray(cand.skip_range), "w": np.asarray(cand.w_range)}
    tensors: dict[str, np.ndarray] = {}
    quantized: set[tuple[str, ...]] = set()
    site_cfg = []
    for i, s in enumerate(sites.sites):
        wb, ab = int(w_bits[i]), int(a_bits[i])
        if s.has_weights and wb < PASSTHROUGH_BITS:
            k = kernel_key(s.path)
            codes, scale = kernel_codes(flat[k], cand.w_clip[s.path], jnp.int32(wb), cand.w_round.get(s.path))
            tensors[f"quant/{s.path}/w_codes"] = pack_codes(np.asarray(codes), wb)
            tensors[f"quant/{s.path}/w_scale"] = _np(scale).reshape(-1)
            quantized.add(k)
        for op in site_operands(s, wb, ab):
            rows = ranges[op][i]
            if not np.isfinite(rows).all():
                raise ValueError(f"site {s.path!r}: the {op!r} ranges at {ab if op != 'w' else wb} bits are not "
                                 "finite (uncalibrated bit-width?); recalibrate before exporting")
            tensors.update({f"quant/{s.path}/{k}": v for k, v in _quantizer_tensors(op, rows, wb if op == "w" else
                                                                                      ab).items()})
        site_cfg.append({"path": s.path, "kind": s.kind, "w_bits": wb, "a_bits": ab, "macs": int(s.macs),
                         "out_channels": int(s.out_channels), "split_at": int(s.split_at),
                         "kernel_shape": list(s.kernel_shape)})
    for k, v in flat.items():
        if k not in quantized:
            tensors["param/" + "/".join(k)] = _np(v)
    ts = [int(t) for t in np.asarray(timesteps)]
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "candidate": name,
        "model": models.spec_to_dict(spec), "source_sha256": source_sha256,
        "sampler": {"kind": "ddim", "eta": 0.0, **spec.schedule.sampler_kwargs(), "timesteps": ts},
        "group_starts": [int(g) for g in np.asarray(cand.group_starts)],
        "bitops": int(bitops(sites, w_bits, a_bits, len(ts))), "fp32_bitops": fp_bitops(sites, len(ts)),
        "sites": site_cfg, "numerics": NUMERICS,
        "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in sorted(tensors.items())},
        **(extra or {}),
    }
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config_sha256": _sha(config),
            "bits_sha256": _sha(_bits_map(config)), "timesteps_sha256": _sha(ts)}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata=meta)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return out


# --- reading ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QuantizedCheckpoint:
    """A checked quantized checkpoint on the host."""

    path: Path
    config: dict
    spec: models.ModelSpec
    sites: SiteTable
    w_bits: np.ndarray  # (L,) int32, pins applied
    a_bits: np.ndarray
    timesteps: np.ndarray  # (N,) int32, sampling order
    group_starts: np.ndarray  # (G,)
    params: dict  # flat {path tuple: f32 array}: everything but the quantized kernels
    codes: dict  # site path -> int8 codes of the kernel's shape
    w_scale: dict  # site path -> (C_out,) f32
    quantizers: dict  # (site path, operand) -> {'range' (G, 2), 'scale' (G,), 'zero_point' (G,)}

    @property
    def num_groups(self) -> int:
        return len(self.group_starts)

    def ranges(self, operand: str) -> np.ndarray:
        """(L, G, 2) ranges of one operand ('a', 'skip', 'w'); zeros where a site does not quantize it."""
        out = np.zeros((len(self.sites), self.num_groups, 2), np.float32)
        for i, s in enumerate(self.sites.sites):
            q = self.quantizers.get((s.path, operand))
            if q is not None:
                out[i] = q["range"]
        return out

    def candidate_quant(self) -> CandidateQuant:
        """The activation quantizers as the simulation's `CandidateQuant` (weights are codes x scale already)."""
        return CandidateQuant(jnp.asarray(self.w_bits), jnp.asarray(self.a_bits), jnp.asarray(self.ranges("a")),
                              jnp.asarray(self.ranges("w")), jnp.asarray(self.ranges("skip")),
                              jnp.asarray(self.group_starts), {}, {})

    def dequantized_kernel(self, path: str) -> np.ndarray:
        return self.codes[path].astype(np.float32) * self.w_scale[path]

    def dequantized_params(self) -> dict:
        """The float32 params tree the runtime's `dequant` mode computes on device (kernels = codes x scale)."""
        flat = dict(self.params)
        for path in self.codes:
            flat[kernel_key(path)] = self.dequantized_kernel(path)
        return unflatten_dict(flat)


def _fail(path: Path, why: str) -> FormatError:
    return FormatError(f"{str(path)!r}: {why}")


def read_quantized(path: str | Path) -> QuantizedCheckpoint:
    """Read and check DIR (or its quant_config.json's folder): every problem is a FormatError naming it."""
    root = Path(path)
    if root.is_file():
        root = root.parent
    cfg_path, w_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{str(p)!r} is missing: {str(root)!r} is not a quantized checkpoint (write one "
                                    "with `python experiments/export.py --workdir W --out DIR`)")
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(cfg_path, f"not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise _fail(cfg_path, f"format {config.get('format') if isinstance(config, dict) else None!r} is not "
                              f"{FORMAT!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise _fail(cfg_path, f"written by format version {config.get('format_version')!r}; this tmpq-jax reads "
                              f"version {FORMAT_VERSION} only (re-export with this version)")
    from safetensors import safe_open

    try:
        with safe_open(str(w_path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors raises its own error types for a truncated or corrupt file
        raise _fail(w_path, f"truncated or corrupt ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
        raise _fail(w_path, f"metadata says format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                            f"valid: {FORMAT!r} version {FORMAT_VERSION}")
    for key, what, value in (("bits_sha256", "the site bit-width map", lambda: _bits_map(config)),
                             ("timesteps_sha256", "the timesteps", lambda: config["sampler"]["timesteps"]),
                             ("config_sha256", "the config", lambda: config)):
        try:
            got = _sha(value())
        except (KeyError, TypeError) as e:
            raise _fail(cfg_path, f"{what} cannot be read ({type(e).__name__}: {e})") from e
        if got != meta.get(key):
            raise _fail(cfg_path, f"{what} in {CONFIG_FILE} differs from the one {WEIGHTS_FILE} was written with "
                                  f"({key} {got[:12]} vs {str(meta.get(key))[:12]}): the file was edited or the two "
                                  "files come from different exports; export again")
    return _checked(root, config, tensors)


def _checked(root: Path, config: dict, tensors: dict) -> QuantizedCheckpoint:
    w_path = root / WEIGHTS_FILE
    declared = config["tensors"]
    missing = sorted(set(declared) - set(tensors))
    unexpected = sorted(set(tensors) - set(declared))
    if missing or unexpected:
        raise _fail(w_path, f"{len(missing)} missing tensors {missing[:4]}, {len(unexpected)} unexpected "
                            f"{unexpected[:4]} against {CONFIG_FILE}")
    for k, d in declared.items():
        if str(tensors[k].dtype) != d["dtype"] or list(tensors[k].shape) != d["shape"]:
            raise _fail(w_path, f"tensor {k!r} is {tensors[k].dtype}{list(tensors[k].shape)}, the config says "
                                f"{d['dtype']}{d['shape']}")
    spec = models.spec_from_dict(config["model"])
    sites, codes, w_scale, quantizers = [], {}, {}, {}
    for e in config["sites"]:
        s = Site(e["path"], e["kind"], int(e["macs"]), int(e["out_channels"]), split_at=int(e["split_at"]),
                 kernel_shape=tuple(e["kernel_shape"]))
        sites.append(s)
        wb, ab = int(e["w_bits"]), int(e["a_bits"])
        quant.check_bits([wb, ab], f"site {s.path!r} bits")
        need = [f"quant/{s.path}/{op}_{k}" for op in site_operands(s, wb, ab) for k in ("range", "scale",
                                                                                        "zero_point")]
        if s.has_weights and wb < PASSTHROUGH_BITS:
            need += [f"quant/{s.path}/w_codes", f"quant/{s.path}/w_scale"]
        elif s.has_weights:
            need.append("param/" + "/".join(kernel_key(s.path)))
        absent = [k for k in need if k not in tensors]
        if absent:
            raise _fail(w_path, f"site {s.path!r} (W{wb}A{ab}) lacks tensors {absent}")
        if s.has_weights and wb < PASSTHROUGH_BITS:
            try:
                c = unpack_codes(tensors[f"quant/{s.path}/w_codes"], wb, s.kernel_shape)
            except ValueError as err:
                raise _fail(w_path, f"site {s.path!r}: {err}") from err
            qmax = (1 << (wb - 1)) - 1
            if np.abs(c.astype(np.int32)).max(initial=0) > qmax:
                raise _fail(w_path, f"site {s.path!r}: codes outside [-{qmax}, {qmax}] of {wb} bits")
            codes[s.path], w_scale[s.path] = c, tensors[f"quant/{s.path}/w_scale"]
        for op in site_operands(s, wb, ab):
            quantizers[(s.path, op)] = {k: tensors[f"quant/{s.path}/{op}_{k}"] for k in ("range", "scale",
                                                                                       "zero_point")}
    table = SiteTable(tuple(sites))
    w = np.asarray([e["w_bits"] for e in config["sites"]], np.int32)
    a = np.asarray([e["a_bits"] for e in config["sites"]], np.int32)
    ts = np.asarray(config["sampler"]["timesteps"], np.int32)
    if bitops(table, w, a, len(ts)) != config["bitops"]:
        raise _fail(root / CONFIG_FILE, f"bitops {config['bitops']} do not match the site map "
                                        f"({bitops(table, w, a, len(ts))})")
    params = {tuple(k[len("param/"):].split("/")): v for k, v in tensors.items() if k.startswith("param/")}
    return QuantizedCheckpoint(root, config, spec, table, w, a, ts, np.asarray(config["group_starts"], np.int32),
                               params, codes, w_scale, quantizers)
