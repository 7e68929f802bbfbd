"""Quantization sites of any `flax.linen` model, found and hooked with `flax.linen.intercept_methods`.

A *site* is one matrix product whose two operands get bit-widths:
- `conv` / `dense`: every `nn.Conv` / `nn.Dense`. Operand "w" is the kernel (per output channel, symmetric),
  operand "a" the input activation (per tensor, static range).
- `matmul`: the two products inside attention, `<attention path>/qk` (a = q, w-slot = k) and
  `<attention path>/av` (a = softmax probabilities, w-slot = v). Both operands are activations with static ranges.
BitOPs of a site are MACs x w_bits x a_bits (TMPQ-DM, Sec. 3). Paths are the modules' scope paths joined by '/'.

Attention modules are hooked in one of two ways, so the model's code is never edited:
- a module that defines `hooked_call(operand_fn, record, *args, **kwargs)` (the project's own attention modules)
  is called through it; its plain `__call__` must equal `hooked_call` with identity operands;
- otherwise its forward is re-implemented in `ATTENTION_IMPLS` (keyed by module class). The diffusers
  `FlaxAttention` is registered there; add other third-party Linen attention classes the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

OperandFn = Callable[[str, str, jax.Array], jax.Array]  # (site path, role 'a'|'w', x) -> x
RecordFn = Callable[[str, str, int, int, tuple], None]  # (site path, kind, MACs, out_channels, kernel shape)
SplitFn = Callable[[str, int], None]  # (conv path, channels of the up path in its concatenated input)


@dataclasses.dataclass(frozen=True)
class Site:
    path: str
    kind: str  # 'conv' | 'dense' | 'matmul'
    macs: int  # per image, per UNet forward
    out_channels: int  # kernel output channels (0 for matmul)
    fixed_w_bits: int = 0  # 0: searched; else pinned by a rule
    fixed_a_bits: int = 0
    split_at: int = 0  # > 0: the input concatenates [up path (split_at channels), skip]; each part has its own range
    kernel_shape: tuple[int, ...] = ()  # () for matmul

    @property
    def has_weights(self) -> bool:
        return self.kind != "matmul"


@dataclasses.dataclass(frozen=True)
class SiteTable:
    """The ordered quantization sites of one model. Hashable, so it can be a static jit argument."""

    sites: tuple[Site, ...]

    def __len__(self) -> int:
        return len(self.sites)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(s.path for s in self.sites)

    def index(self, path: str) -> int:
        try:
            return self.paths.index(path)
        except ValueError:
            close = [p for p in self.paths if path.split("/")[-1] in p][:5]
            raise KeyError(f"unknown site {path!r}; {len(self)} sites exist, e.g. {close or list(self.paths[:5])}")

    @property
    def macs(self) -> np.ndarray:
        return np.asarray([s.macs for s in self.sites], np.int64)

    @property
    def weight_sites(self) -> tuple[Site, ...]:
        return tuple(s for s in self.sites if s.has_weights)

    def vector_from_map(self, bits_by_path: dict[str, int], name: str, default: int | None = None) -> np.ndarray:
        """{site path: bits} -> a length-L vector; unknown paths and missing paths are errors."""
        unknown = sorted(set(bits_by_path) - set(self.paths))
        if unknown:
            raise KeyError(f"{name}: unknown site names {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; "
                           f"valid names are listed by `SiteTable.paths` (e.g. {self.paths[0]!r})")
        missing = [p for p in self.paths if p not in bits_by_path]
        if missing and default is None:
            raise KeyError(f"{name}: no bit-width given for {len(missing)} sites, e.g. {missing[:3]}")
        return np.asarray([bits_by_path.get(p, default) for p in self.paths], np.int32)


def module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


# --- attention implementations --------------------------------------------------------------------------------


QUERY_CHUNK_SIZE = 1024  # queries per block on the memory-efficient path (diffusers' default query_chunk_size)


def _attend(q, k, v, scale, probs_fn):
    """softmax(q k^T * scale) v on (B*heads, T, dim_head) operands; `probs_fn` hooks the probabilities."""
    scores = jnp.einsum("b i d, b j d->b i j", q, k) * scale
    probs = probs_fn(nn.softmax(scores, axis=-1))
    return jnp.einsum("b i j, b j d -> b i d", probs, v)


def _attend_chunked(q, k, v, scale, probs_fn, chunk: int):
    """`_attend` over blocks of `chunk` queries (a `lax.map`, plus one block for the remainder), so scores and
    probabilities live as (B*heads, chunk, Tk) at a time. Needs an elementwise `probs_fn`."""
    bh, tq, d = q.shape
    n, rest = divmod(tq, chunk)
    # full blocks: (n, B*heads, chunk, d) -> map -> (B*heads, n * chunk, d_v)
    blocks = q[:, :n * chunk].reshape(bh, n, chunk, d).transpose(1, 0, 2, 3)
    out = jax.lax.map(lambda qb: _attend(qb, k, v, scale, probs_fn), blocks)
    out = out.transpose(1, 0, 2, 3).reshape(bh, n * chunk, out.shape[-1])
    if rest:  # the last, shorter block (static shapes)
        out = jnp.concatenate([out, _attend(q[:, n * chunk:], k, v, scale, probs_fn)], axis=1)
    return out


def _diffusers_attention(module, operand_fn: OperandFn, record: RecordFn | None, hidden_states, context=None,
                         deterministic=True):
    """The diffusers FlaxAttention forward with hooks on the q, k, v and probability operands.

    Operands reach `operand_fn` as (B*heads, T, dim_head) and (B*heads, Tq, Tk) whatever `split_head_dim` says
    (a layout choice in diffusers), so sites, MACs, calibration and outputs do not depend on it.
    With `use_memory_efficient_attention`, queries are processed in blocks of `QUERY_CHUNK_SIZE` (full-key softmax
    per block), so `operand_fn` sees the probabilities block by block; this assumes it is elementwise, as the
    static-range fake quant is. An observer `operand_fn` (one returning q, k and v themselves, as calibration and
    site discovery do) may take whole-tensor statistics once per call, so it gets the whole probability tensor.
    """
    path = module_path(module)
    context = hidden_states if context is None else context
    # project and split heads: (B*heads, T, dim_head)
    q = module.reshape_heads_to_batch_dim(module.query(hidden_states))
    k = module.reshape_heads_to_batch_dim(module.key(context))
    v = module.reshape_heads_to_batch_dim(module.value(context))
    if record is not None:  # per image: heads * Tq * Tk * dim_head for each product
        record(f"{path}/qk", "matmul", math.prod(q.shape) * k.shape[1] // hidden_states.shape[0], 0, ())
        record(f"{path}/av", "matmul", math.prod(q.shape) * k.shape[1] // hidden_states.shape[0], 0, ())
    # quantize q, k, v once
    qq, kk = operand_fn(f"{path}/qk", "a", q), operand_fn(f"{path}/qk", "w", k)
    vv = operand_fn(f"{path}/av", "w", v)
    observer = qq is q and kk is k and vv is v

    def probs_fn(p):
        return operand_fn(f"{path}/av", "a", p)

    # attention: whole, or in query blocks
    tq = q.shape[1]
    if getattr(module, "use_memory_efficient_attention", False) and not observer and QUERY_CHUNK_SIZE < tq:
        out = _attend_chunked(qq, kk, vv, module.scale, probs_fn, QUERY_CHUNK_SIZE)
    else:
        out = _attend(qq, kk, vv, module.scale, probs_fn)
    out = module.reshape_batch_dim_to_heads(out)
    return module.dropout_layer(module.proj_attn(out), deterministic=deterministic)


def _attention_registry() -> dict[type, Callable]:
    from diffusers.models.attention_flax import FlaxAttention

    return {FlaxAttention: _diffusers_attention}


ATTENTION_IMPLS: dict[type, Callable] = {}


def attention_impl(module: nn.Module):
    if callable(getattr(module, "hooked_call", None)):
        return lambda m, operand_fn, record, *a, **k: m.hooked_call(operand_fn, record, *a, **k)
    if not ATTENTION_IMPLS:
        ATTENTION_IMPLS.update(_attention_registry())
    for cls, impl in ATTENTION_IMPLS.items():
        if isinstance(module, cls):
            return impl
    return None


def _up_block_classes() -> tuple[type, ...]:
    from diffusers.models.unets.unet_2d_blocks_flax import FlaxCrossAttnUpBlock2D, FlaxUpBlock2D

    return FlaxUpBlock2D, FlaxCrossAttnUpBlock2D


UP_BLOCK_CLASSES: list[type] = []


def concatenates_skips(module: nn.Module) -> bool:
    """An up block whose resnet i takes concat([up path, skip]) (diffusers' Flax up blocks, and modules that set
    `concatenates_skips = True`, like the UNet2DModel port's)."""
    if getattr(module, "concatenates_skips", False) is True:
        return True
    if not UP_BLOCK_CLASSES:
        UP_BLOCK_CLASSES.extend(_up_block_classes())
    return isinstance(module, tuple(UP_BLOCK_CLASSES))


def skip_splits(module: nn.Module, hidden_states) -> dict[str, int]:
    """{1x1 shortcut path: up-path channels} of an up block's resnets: resnet i's input is concat([h, skip]), h the
    block input (i = 0) or the previous resnet's output (out_channels). The shortcut conv is the one site that takes
    this concatenation raw (conv1 sees it after GroupNorm and SiLU), as in Q-Diffusion's split (Sec. 4.3)."""
    path = module_path(module)
    return {f"{path}/resnets_{i}/conv_shortcut": int(hidden_states.shape[-1] if i == 0 else module.out_channels)
            for i in range(int(module.num_layers))}


def make_interceptor(operand_fn: OperandFn, record: RecordFn | None = None, record_split: SplitFn | None = None):
    """An `nn.intercept_methods` interceptor that routes every site operand through `operand_fn`. Discovery passes
    `record` (each site's kind, MACs and kernel) and `record_split` (the split inputs of up blocks)."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if record_split is not None and concatenates_skips(module):
            for path, split in skip_splits(module, args[0]).items():
                record_split(path, split)
        impl = attention_impl(module)
        if impl is not None:
            return impl(module, operand_fn, record, *args, **kwargs)
        if isinstance(module, (nn.Conv, nn.Dense)):
            path = module_path(module)
            out = next_fun(operand_fn(path, "a", args[0]), *args[1:], **kwargs)
            if record is not None:
                kernel = module.variables["params"]["kernel"]
                macs = math.prod(out.shape[1:-1]) * math.prod(kernel.shape)
                record(path, "conv" if isinstance(module, nn.Conv) else "dense", int(macs), int(kernel.shape[-1]),
                       tuple(int(d) for d in kernel.shape))
            return out
        return next_fun(*args, **kwargs)

    return interceptor


# --- discovery ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """Pin the bits of every site whose path matches `pattern` (re.search). 0 leaves that operand searched.

    `unique`: the pattern must match exactly one site; `hint`: what a user whose model does not fit the rule can do
    (appended to its errors)."""

    pattern: str
    w_bits: int = 0
    a_bits: int = 0
    unique: bool = False
    hint: str = ""


# The reference code keeps the attention-probability operand at 8 bits.
DEFAULT_RULES: tuple[QuantRule, ...] = (QuantRule(r"/av$", a_bits=8),)


def discover_sites(apply_fn: Callable, params_shapes: Any, example_inputs: Sequence[Any],
                   rules: Sequence[QuantRule] = DEFAULT_RULES, split_skip: bool = False) -> SiteTable:
    """Trace `apply_fn(params, *inputs)` abstractly (no FLOPs) and list its sites with MACs per image.

    `example_inputs` must have batch size 1 so MACs come out per image. `split_skip`: the 1x1 shortcut of each up
    block resnet quantizes its input's up-path and skip channels with separate ranges (`Site.split_at`).
    """
    found: dict[str, list] = {}
    splits: dict[str, int] = {}

    def record(path, kind, macs, out_channels, kernel_shape):
        if path in found:  # a module called twice shares its quantizers; its MACs add up
            found[path][1] += macs
        else:
            found[path] = [kind, macs, out_channels, kernel_shape]

    def run(p, *inputs):
        with nn.intercept_methods(make_interceptor(lambda path, role, x: x, record, splits.__setitem__)):
            return apply_fn(p, *inputs)

    jax.eval_shape(run, params_shapes, *example_inputs)
    sites = [Site(path, kind, int(macs), int(oc), kernel_shape=ks,
                  split_at=splits.get(path, 0) if split_skip and kind == "conv" else 0)
             for path, (kind, macs, oc, ks) in found.items()]
    return SiteTable(tuple(apply_rules(sites, rules)))


def apply_rules(sites: list[Site], rules: Sequence[QuantRule]) -> list[Site]:
    from tmpq_jax.quant.fake_quant import check_bits

    out = list(sites)
    for rule in rules:
        for name, b in (("w_bits", rule.w_bits), ("a_bits", rule.a_bits)):
            if b:
                check_bits([b], f"rule {rule.pattern!r} {name}")
        hits = [i for i, s in enumerate(out) if re.search(rule.pattern, s.path)]
        hint = f"; {rule.hint}" if rule.hint else ""
        if not hits:
            raise ValueError(f"quantization rule {rule.pattern!r} matches no site; site paths look like "
                             f"{out[0].path!r} (see SiteTable.paths){hint}")
        if rule.unique and len(hits) != 1:
            raise ValueError(f"quantization rule {rule.pattern!r} must match one site, but matches {len(hits)} "
                             f"({[out[i].path for i in hits[:3]]}){hint}")
        for i in hits:
            s = out[i]
            if rule.w_bits and not s.has_weights and s.kind != "matmul":
                raise ValueError(f"rule {rule.pattern!r} pins w_bits of {s.path!r}, which has no w operand")
            out[i] = dataclasses.replace(s, fixed_w_bits=rule.w_bits or s.fixed_w_bits,
                                         fixed_a_bits=rule.a_bits or s.fixed_a_bits)
    return out


# the UNet's first and last layer in diffusers' naming (every built-in family and diffusers checkpoint)
FIRST_LAST_PATTERNS = (r"(^|/)conv_in$", r"(^|/)conv_out$")


def first_last_rules(bits: int) -> tuple[QuantRule, ...]:
    """Rules pinning the weights and activations of the model's first layer (`conv_in`: it reads the noisy sample
    x_t) and last layer (`conv_out`) at `bits` (0: none), the convention of BRECQ-style PTQ code (its "8-bit head
    and stem"). Each must match exactly one site. Put them before a user's rules, whose pins then win.

    Measured on mnist-small at N = 10 (README "Calibration"): 6-bit activations at conv_in alone cost about as much
    Inception FID as 6-bit activations everywhere; the two layers hold 0.18% of its MACs.
    """
    if not bits:
        return ()
    from tmpq_jax.quant.fake_quant import check_bits

    check_bits([bits], "first_last_bits")
    hint = ("config.first_last_bits finds the first and last layer by the names conv_in and conv_out: set it to 0 "
            "and pin these layers with config.rules")
    return tuple(QuantRule(p, w_bits=bits, a_bits=bits, unique=True, hint=hint) for p in FIRST_LAST_PATTERNS)


def kernel_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")) + ("kernel",)
