"""Evaluate mixed-precision candidates: gather table rows, quantize weights once, sample with static ranges.

Everything here is a pure function of arrays, so a population is just a leading axis:
`sample_population(..., strategy=)` runs it as a Python loop, `jit(vmap)`, a chunked `lax.map`, or sharded over
a device mesh axis named "pop".
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tmpq_jax.quant.calibrate import QuantTables, group_of, split_parts
from tmpq_jax.quant.fake_quant import (PASSTHROUGH_BITS, check_bits, qdq_asymmetric, qdq_symmetric,
                                       qdq_symmetric_rounded, symmetric_codes)
from tmpq_jax.quant.sites import SiteTable, kernel_key, make_interceptor

STRATEGIES = ("auto", "loop", "vmap", "map", "sharded")


@flax.struct.dataclass
class CandidateQuant:
    """One candidate's quantizer parameters, gathered from the shared tables."""

    w_bits: jax.Array  # (L,)
    a_bits: jax.Array  # (L,)
    a_range: jax.Array  # (L, G, 2): one range per timestep group
    w_range: jax.Array  # (L, G, 2)
    skip_range: jax.Array  # (L, G, 2): the skip part of split inputs
    group_starts: jax.Array  # (G,)
    w_clip: dict  # path -> (C_out,)
    w_round: dict  # path -> (ceil(K / 8),) uint8 packed rounding bits; {} = round to nearest

    def ranges_at(self, group) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(a_range, w_range, skip_range) of one timestep group, each (L, 2)."""
        return self.a_range[:, group], self.w_range[:, group], self.skip_range[:, group]


def resolve_bits(sites: SiteTable, w_bits: jax.Array, a_bits: jax.Array):
    """Apply the sites' pinned bit-widths (rules) over the candidate's."""
    fw = jnp.asarray([s.fixed_w_bits for s in sites.sites], jnp.int32)
    fa = jnp.asarray([s.fixed_a_bits for s in sites.sites], jnp.int32)
    return jnp.where(fw > 0, fw, w_bits).astype(jnp.int32), jnp.where(fa > 0, fa, a_bits).astype(jnp.int32)


def check_candidate_bits(sites: SiteTable, tables: QuantTables, w_bits, a_bits) -> None:
    """Concrete checks of one candidate (L,) or a population (P, L) of bit-widths.

    Integers in [2, 16], one per site, and every bit-width below 16 that a site uses (after pinned bits) was
    calibrated; >= 16 passes through. Raises ValueError naming the bad bit-widths, how many sites (and candidates)
    use them, and the calibrated bit-widths.
    """
    n = len(sites)
    known = sorted(set(np.asarray(tables.table_bits).tolist()))
    arrs = []
    for name, b in (("w_bits", w_bits), ("a_bits", a_bits)):
        arr = np.asarray(b)
        if arr.ndim not in (1, 2) or arr.shape[-1] != n:
            raise ValueError(f"{name} must be a vector of length {n} (one per site) or a population of shape "
                             f"(P, {n}), got shape {arr.shape}")
        arrs.append(check_bits(arr, name))
    if arrs[0].shape != arrs[1].shape:
        raise ValueError(f"w_bits and a_bits must have the same shape, got {arrs[0].shape} and {arrs[1].shape}")
    pinned = (np.asarray([s.fixed_w_bits for s in sites.sites]), np.asarray([s.fixed_a_bits for s in sites.sites]))
    for name, arr, fixed in zip(("w_bits", "a_bits"), arrs, pinned):
        used = np.where(fixed > 0, fixed, arr)
        bad = (used < PASSTHROUGH_BITS) & ~np.isin(used, known)
        if not bad.any():
            continue
        missing = sorted(set(used[bad].tolist()))
        bad_sites = np.flatnonzero(bad.reshape(-1, n).any(axis=0))
        where = f"at {len(bad_sites)} of {n} sites (first: {sites.sites[bad_sites[0]].path!r})"
        if arr.ndim == 2:
            bad_cands = np.flatnonzero(bad.any(axis=1))
            where += f" in {len(bad_cands)} of {arr.shape[0]} candidates (first: #{bad_cands[0]})"
        raise ValueError(f"{name} uses bit-widths {missing} that the tables were not calibrated for, {where}; "
                         f"calibrated: {known} (and >= {PASSTHROUGH_BITS} passes through). Use calibrated "
                         f"bit-widths or recalibrate with these in bit_choices")


def _is_traced(*trees) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for tree in trees for leaf in jax.tree.leaves(tree))


def check_candidate_bits_if_concrete(sites: SiteTable, tables: QuantTables, w_bits, a_bits) -> None:
    """`check_candidate_bits` when bits and `tables.table_bits` are concrete; traced calls are left to the traced
    guard (`QuantTables.bit_row`: an uncalibrated bit-width gathers NaN parameters, never another row)."""
    if not _is_traced(w_bits, a_bits, tables.table_bits):
        check_candidate_bits(sites, tables, w_bits, a_bits)


def gather_candidate(tables: QuantTables, sites: SiteTable, w_bits: jax.Array, a_bits: jax.Array) -> CandidateQuant:
    """One candidate's quantizer parameters: the table rows of its (pinned-resolved) bit-widths.

    Concrete bits are checked (ValueError on uncalibrated bit-widths). Traced bits cannot be: a bit-width < 16 the
    tables lack gathers NaN parameters, so the candidate's outputs are NaN (infeasible to the search), never the
    parameters of another bit-width. Bit-widths >= 16 pass through exactly.
    """
    check_candidate_bits_if_concrete(sites, tables, w_bits, a_bits)
    w_bits, a_bits = resolve_bits(sites, jnp.asarray(w_bits), jnp.asarray(a_bits))
    wr, ar = tables.bit_row(w_bits), tables.bit_row(a_bits)
    idx, groups = jnp.arange(len(sites))[:, None], jnp.arange(tables.num_groups)[None, :]
    take = tables.take_row
    w_clip = {s.path: take(tables.w_clip[s.path], wr[i]) for i, s in enumerate(sites.sites) if s.has_weights}
    # an uncalibrated bit-width's row reads NaN clips, so its rounding bits (any row) never matter
    w_round = {p: jnp.take(r, wr[sites.index(p)], axis=0, mode="clip") for p, r in tables.w_round.items()}

    def ranges(table, rows):  # (L, G, B, 2) -> (L, G, 2)
        return table.at[idx, groups, rows[:, None]].get(mode="fill", fill_value=jnp.nan)

    return CandidateQuant(w_bits, a_bits, ranges(tables.a_range, ar), ranges(tables.w_range, wr),
                          ranges(tables.skip_range, ar), tables.group_starts, w_clip, w_round)


def unpack_rounding(packed: jax.Array, shape) -> jax.Array:
    """Packed rounding bits (ceil(K / 8),) uint8 -> {0, 1} of `shape` (K entries; numpy's big-endian bit order)."""
    return jnp.unpackbits(packed, count=int(np.prod(shape))).reshape(shape)


def kernel_codes(w: jax.Array, clip: jax.Array, bits: jax.Array, packed_round: jax.Array | None = None):
    """(integer codes int32, per-output-channel scale f32) of one kernel: what `quantize_kernel` multiplies back,
    for export (codes x scale equals its output exactly below 16 bits)."""
    up = None if packed_round is None else unpack_rounding(packed_round, w.shape)
    codes, scale = symmetric_codes(w, clip, bits, up)
    return codes.astype(jnp.int32), scale


def quantize_kernel(w: jax.Array, clip: jax.Array, bits: jax.Array, packed_round: jax.Array | None = None):
    """One kernel's QDQ: per output channel, symmetric; round to nearest, or floor + the learned rounding bits."""
    if packed_round is None:
        return qdq_symmetric(w, clip, bits)
    return qdq_symmetric_rounded(w, clip, bits, unpack_rounding(packed_round, w.shape))


def quantize_params(params: Any, sites: SiteTable, cand: CandidateQuant) -> Any:
    """QDQ every site kernel once (per output channel, symmetric). Other leaves are untouched."""
    flat = flatten_dict(flax.core.unfreeze(params))
    for i, s in enumerate(sites.sites):
        if s.has_weights:
            k = kernel_key(s.path)
            flat[k] = quantize_kernel(flat[k], cand.w_clip[s.path], cand.w_bits[i], cand.w_round.get(s.path))
    return unflatten_dict(flat)


def site_operand_fn(sites: SiteTable, a_range, w_range, skip_range, a_bits, w_bits):
    """operand_fn of `make_interceptor` that fake-quantizes every site operand at static ranges ((L, 2) each); the
    "a" operand of a split input (`Site.split_at`) quantizes its up-path part with `a_range` and its skip part with
    `skip_range`."""
    index = {p: i for i, p in enumerate(sites.paths)}

    def operand_fn(path, role, x):
        i = index[path]
        if role == "w":
            return qdq_asymmetric(x, w_range[i, 0], w_range[i, 1], w_bits[i])
        parts = split_parts(sites.sites[i], x)
        out = [qdq_asymmetric(part, r[i, 0], r[i, 1], a_bits[i]) for part, r in zip(parts, (a_range, skip_range))]
        return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)

    return operand_fn


def quantized_apply(apply_fn: Callable, sites: SiteTable, cand: CandidateQuant, timestep_arg: int = 1) -> Callable:
    """apply_fn with every site operand fake-quantized at its static calibrated range.

    With one range per timestep group (G > 1), a call reads the group of its timestep `inputs[timestep_arg]` (its
    first entry: one timestep per call, as in DDIM sampling); with G = 1 the inputs need no timestep.
    """

    def fn(params, *inputs):
        group = 0
        if cand.group_starts.shape[-1] > 1:
            group = group_of(cand.group_starts, jnp.reshape(inputs[timestep_arg], (-1,))[0])
        operand_fn = site_operand_fn(sites, *cand.ranges_at(group), cand.a_bits, cand.w_bits)
        with nn.intercept_methods(make_interceptor(operand_fn)):
            return apply_fn(params, *inputs)

    return fn


# --- population strategies ----------------------------------------------------------------------------------------


def auto_strategy(devices=None) -> str:
    """'sharded' over several devices; 'map' (chunked lax.map) on one GPU/TPU; 'loop' on one CPU.

    Measured with experiments/bench_population.py (P candidates x B images, one forward each):
    - one H200, cifar-ddpm, P=16 x B=64: map 5819 img/s, vmap 5305, loop 5244
      (benchmarks/population_cifar-ddpm_H200.json);
    - 2-core CPU, mnist-small, P=8 x B=32: map 196 img/s, loop 171 (benchmarks/population_mnist-small_cpu.json,
      one run). But map compiles one program per population size and the loop one in all, so one CPU uses the loop.
    """
    devices = devices or jax.devices()
    if len(devices) > 1:
        return "sharded"
    return "loop" if devices[0].platform == "cpu" else "map"


def population_fn(fn: Callable, strategy: str = "auto", chunk_size: int = 1, devices=None) -> Callable:
    """Lift fn(*candidate_args, *shared) to fn(*population_args, *shared) with a leading population axis.

    `population_fn(f, ...)(pop_args_tuple, shared_args_tuple)`; outputs are stacked on axis 0.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown population strategy {strategy!r}; valid: {STRATEGIES}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    devices = list(devices or jax.devices())
    strategy = auto_strategy(devices) if strategy == "auto" else strategy
    inner = "map" if devices[0].platform == "cpu" else "vmap"

    def run_local(kind, pop, shared):
        if kind == "vmap":
            return jax.vmap(lambda *c: fn(*c, *shared))(*pop)
        return jax.lax.map(lambda c: fn(*c, *shared), pop, batch_size=chunk_size if chunk_size > 1 else None)

    if strategy == "loop":
        single = jax.jit(fn)

        def run(pop, shared):
            n = jax.tree.leaves(pop)[0].shape[0]
            outs = [single(*jax.tree.map(lambda a: a[i], pop), *shared) for i in range(n)]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

        return run
    if strategy in ("vmap", "map"):
        return jax.jit(functools.partial(run_local, strategy))

    mesh = Mesh(np.asarray(devices), ("pop",))
    spec = PartitionSpec("pop")
    local = functools.partial(run_local, inner)
    sharded = jax.jit(jax.shard_map(lambda pop, shared: local(pop, shared), mesh=mesh,
                                    in_specs=(spec, PartitionSpec()), out_specs=spec, check_vma=False))

    def run(pop, shared):
        n = jax.tree.leaves(pop)[0].shape[0]
        pad = (-n) % len(devices)
        pop = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, 0)]) if pad else a, pop)
        pop = jax.device_put(pop, NamedSharding(mesh, spec))
        out = sharded(pop, shared)
        return jax.tree.map(lambda a: a[:n], out)

    return run


# --- BitOPs -------------------------------------------------------------------------------------------------------


def bitops(sites: SiteTable, w_bits, a_bits, num_steps: int) -> int | np.ndarray:
    """Exact BitOPs per image (TMPQ-DM eq. 6): sum over sites of MACs x w_bits x a_bits, pinned bits (rules)
    applied, times the sampling steps. Host int64: a Python int for one candidate (L,), an int64 array (P,) for a
    population (P, L); never a float, so costs next to the exact `Budget` compare exactly."""
    w, a = np.asarray(w_bits, np.int64), np.asarray(a_bits, np.int64)
    fw = np.asarray([s.fixed_w_bits for s in sites.sites], np.int64)
    fa = np.asarray([s.fixed_a_bits for s in sites.sites], np.int64)
    w, a = np.where(fw > 0, fw, w), np.where(fa > 0, fa, a)
    total = (sites.macs * w * a).sum(-1) * np.int64(num_steps)
    return int(total) if np.ndim(total) == 0 else total


def fp_bitops(sites: SiteTable, num_steps: int, bits: int = 32) -> int:
    return int(sites.macs.sum()) * bits * bits * int(num_steps)
