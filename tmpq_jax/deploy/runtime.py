"""Generate from a quantized checkpoint without the search: `QuantizedModel.load(DIR, mode)`.

Modes:
- `dequant`: the int8 weight codes live on the device; the jitted forward multiplies them by their scales and
  fake-quantizes every activation with the stored quantizers, exactly as the search's simulation does
  (`quant.quantized_apply`), so its images are the simulated images.
- `int`: every Conv/Dense site at <= 8 weight and activation bits quantizes its input into int8 containers and runs
  an int8 x int8 -> int32 convolution or `dot_general` (`deploy.integer`), then one float rescale per output
  channel. Sites that cannot (attention products, whose two operands are both activations; >= 16-bit operands;
  non-zero paddings) run as in `dequant` and are listed in `fallbacks` with the reason.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from tmpq_jax import diffusion, models
from tmpq_jax.deploy import integer
from tmpq_jax.deploy.quantized import QuantizedCheckpoint, read_quantized
from tmpq_jax.diffusion.noise import fixed_batches
from tmpq_jax.quant.calibrate import group_of, split_parts
from tmpq_jax.quant.engine import site_operand_fn
from tmpq_jax.quant.fake_quant import PASSTHROUGH_BITS
from tmpq_jax.quant.sites import attention_impl, kernel_key, module_path

MODES = ("dequant", "int")


def _dequantize(params: dict, codes: dict, scales: dict) -> dict:
    """params with every quantized kernel set to codes x scale (float32; the simulation's kernel exactly)."""
    flat = flatten_dict(params)
    for path, c in codes.items():
        flat[kernel_key(path)] = c.astype(jnp.float32) * scales[path]
    return unflatten_dict(flat)


@dataclasses.dataclass
class QuantizedModel:
    """A loaded checkpoint: the model, device arrays and a jitted sampler for one execution mode."""

    ckpt: QuantizedCheckpoint
    mode: str
    model: Any
    params: Any  # device f32 params without the quantized kernels
    codes: dict  # site path -> int8 device array
    scales: dict  # site path -> f32 (C_out,)
    cand: Any  # CandidateQuant: activation quantizers and bits on the device
    spec: models.ModelSpec = None  # the checkpoint's, or with other prompts (`with_prompts`)
    fallbacks: dict = dataclasses.field(default_factory=dict)  # site path -> why it is not run on integers
    int_only: frozenset | None = None  # `int` mode: run only these sites on integers (None: every site that can)
    _sampler: Any = dataclasses.field(default=None, repr=False)  # `sample`'s jitted sampler

    @classmethod
    def load(cls, path: str | Path, mode: str = "dequant") -> QuantizedModel:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is invalid; valid: {MODES}")
        ckpt = read_quantized(path)
        model = models.build_model(ckpt.spec)
        params = jax.device_put(unflatten_dict(ckpt.params))
        codes = {p: jax.device_put(c) for p, c in ckpt.codes.items()}
        scales = {p: jax.device_put(s) for p, s in ckpt.w_scale.items()}
        out = cls(ckpt, mode, model, params, codes, scales, jax.device_put(ckpt.candidate_quant()), ckpt.spec)
        out.fallbacks = out._trace_fallbacks() if mode == "int" else {}
        return out

    # --- shapes and sizes ------------------------------------------------------------------------------------------

    def with_prompts(self, embeds, negative) -> QuantizedModel:
        """A text model conditioned on other prompt tables (P, L, D): prompt index i selects row i."""
        if self.spec.conditioning != "text":
            raise ValueError(f"prompts need a text-to-image model; this checkpoint's model is "
                             f"{self.spec.conditioning!r}-conditioned")
        embeds, negative = np.asarray(embeds, np.float32), np.asarray(negative, np.float32)
        want = tuple(np.shape(self.params["prompt_embeds"]))[1:]
        if embeds.shape[1:] != want or negative.shape != embeds.shape:
            raise ValueError(f"prompt tables of shape {embeds.shape} / {negative.shape} do not fit the UNet: "
                             f"want (P, {want[0]}, {want[1]}) for both")
        spec = dataclasses.replace(self.spec, num_classes=len(embeds))
        params = {**self.params, "prompt_embeds": jnp.asarray(embeds), "negative_embeds": jnp.asarray(negative)}
        return dataclasses.replace(self, model=models.build_model(spec), params=params, spec=spec, _sampler=None)

    @property
    def timesteps(self) -> np.ndarray:
        return self.ckpt.timesteps

    def device_bytes(self) -> int:
        """Bytes of every parameter array held on the device (codes int8, the rest float32)."""
        leaves = jax.tree.leaves((self.params, self.codes, self.scales, self.cand))
        return int(sum(x.nbytes for x in leaves))

    # --- the forward ----------------------------------------------------------------------------------------------

    def _apply(self, params, *inputs):
        return self.model.apply({"params": params}, *inputs)

    def eps_fn(self, params, codes, scales, cand, record: dict | None = None) -> Callable:
        """(x, t, y) -> model output of one UNet call at timestep t (one t per call, as in DDIM). `cand`: the
        activation quantizers (`QuantizedCheckpoint.candidate_quant`), an argument of the jitted programs as in
        the simulation, so that XLA compiles the same arithmetic (no constant-folded scales)."""
        ck = self.ckpt
        full = _dequantize(params, codes, scales)  # in `int` mode only fallback sites read these kernels

        def fn(x, t, y):
            group = group_of(cand.group_starts, jnp.reshape(t, (-1,))[0]) if ck.num_groups > 1 else 0
            operand_fn = site_operand_fn(ck.sites, *cand.ranges_at(group), cand.a_bits, cand.w_bits)
            if self.mode == "dequant":
                from tmpq_jax.quant.sites import make_interceptor

                interceptor = make_interceptor(operand_fn)
            else:
                interceptor = self._int_interceptor(operand_fn, params, codes, scales, cand, group, record)
            with nn.intercept_methods(interceptor):
                return self._apply(full, x, t, y)

        return fn

    def _int_interceptor(self, operand_fn, params, codes, scales, cand, group, record):
        ck, flat = self.ckpt, flatten_dict(params)
        index = {p: i for i, p in enumerate(ck.sites.paths)}
        ranges = {"a": cand.a_range[:, group], "skip": cand.skip_range[:, group]}

        def run_int(module, path, x):
            i = index[path]
            site, ab = ck.sites.sites[i], int(ck.a_bits[i])
            kernel = codes[path]
            parts = split_parts(site, x)
            k_parts = (kernel[..., :site.split_at, :], kernel[..., site.split_at:, :]) if site.split_at else (kernel,)
            y = 0.0
            for part, k_part, op in zip(parts, k_parts, ("a", "skip")):
                q, shift, s_a = integer.int8_activation(part, ranges[op][i, 0], ranges[op][i, 1], ab)
                conv = {}
                if isinstance(module, nn.Conv):
                    rank = kernel.ndim - 2
                    conv = dict(pads=integer.conv_pads(module, part.shape, kernel.shape),
                                strides=integer._tuple(module.strides, rank),
                                kernel_dilation=integer._tuple(module.kernel_dilation, rank),
                                groups=int(module.feature_group_count))
                    acc = integer.conv_accumulator(q, k_part, shift, **conv)
                else:
                    acc = integer.dense_accumulator(q, k_part, shift)
                if record is not None:  # (outside jit) the integer operands and result of each part
                    record.setdefault(path, []).append(dict(acc=acc, q=q, shift=shift, codes=k_part, **conv))
                y = y + acc.astype(jnp.float32) * (s_a * scales[path])
            bias = flat.get(tuple(path.split("/")) + ("bias",))
            return y if bias is None else y + bias

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            impl = attention_impl(module)
            if impl is not None:  # the products run fake-quantized; the projections inside come back here
                return impl(module, operand_fn, None, *args, **kwargs)
            if isinstance(module, (nn.Conv, nn.Dense)):
                path = module_path(module)
                if path in codes and path not in self.fallbacks and (self.int_only is None or
                                                                     path in self.int_only):
                    return run_int(module, path, args[0])
                return next_fun(operand_fn(path, "a", args[0]) if path in index else args[0], *args[1:], **kwargs)
            return next_fun(*args, **kwargs)

        return interceptor

    def _trace_fallbacks(self) -> dict:
        """Which sites the `int` mode runs as fake-quant float, and why (found by tracing one forward)."""
        ck, out = self.ckpt, {}
        for s, wb, ab in zip(ck.sites.sites, ck.w_bits, ck.a_bits):
            if not s.has_weights:
                out[s.path] = "attention product: both operands are activations (run fake-quantized in float32)"
            elif int(wb) >= PASSTHROUGH_BITS or int(ab) >= PASSTHROUGH_BITS:
                out[s.path] = f"W{int(wb)}A{int(ab)}: an operand at >= {PASSTHROUGH_BITS} bits"
        seen: dict = {}

        def spy(next_fun, args, kwargs, context):
            m = context.module
            if context.method_name == "__call__" and isinstance(m, nn.Conv):
                why = integer.conv_unsupported(m)
                if why is not None:
                    seen[module_path(m)] = why
            return next_fun(*args, **kwargs)

        x, t, y = models.example_inputs(self.spec)
        with nn.intercept_methods(spy):
            jax.eval_shape(lambda p: self._apply(p, x, t, y), _dequantize(self.params, self.codes, self.scales))
        out.update({p: w for p, w in seen.items() if p in self.codes})
        return out

    # --- sampling ------------------------------------------------------------------------------------------------

    @property
    def arrays(self) -> tuple:
        """The device arguments of `forward_fn` and `sampler_fn`: (params, codes, scales, cand)."""
        return self.params, self.codes, self.scales, self.cand

    def forward_fn(self) -> Callable:
        """jit((params, codes, scales, cand, x, t, y) -> output) of one UNet call."""
        return jax.jit(lambda p, c, s, q, x, t, y: self.eps_fn(p, c, s, q)(x, t, y))

    def sampler_fn(self, decode: bool = True) -> Callable:
        """jit((params, codes, scales, cand, noise, labels) -> samples): DDIM over the checkpoint's timesteps, then the
        VAE decode of a latent model (full precision)."""
        sched = self.spec.schedule
        abar = jnp.asarray(sched.alphas_cumprod(), jnp.float32)
        ts = jnp.asarray(self.timesteps)
        kw = sched.sampler_kwargs()

        def run(p, c, s, q, noise, labels):
            out = diffusion.ddim_sample(self.eps_fn(p, c, s, q), abar, ts, noise, labels, **kw)
            if decode and self.spec.decoder:
                out = self.model.apply({"params": p}, out, method="decode")
            return out

        return jax.jit(run)

    def sample(self, noise, labels, batch: int = 256, progress: Callable | None = None) -> np.ndarray:
        """Images (n, H, W, C) in [-1, 1] (decoded for latent models), `batch` rows at a time; the jitted sampler is
        built once per model."""
        if self._sampler is None:
            self._sampler = self.sampler_fn()
        fn = self._sampler
        outs = []
        for idx, real in fixed_batches(len(noise), batch):  # one batch size: one compile, as in the search
            outs.append(np.asarray(fn(*self.arrays, noise[idx], labels[idx]))[:real])
            if progress is not None:
                progress(real)
        return np.concatenate(outs)
