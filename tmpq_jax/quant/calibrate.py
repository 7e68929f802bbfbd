"""Shared per-bit calibration ("quantization parameter sharing", TMPQ-DM Sec. 3.3).

Quantizer parameters are calibrated once per site, per candidate bit-width and per timestep group, on UNet inputs
collected from full-precision DDIM trajectories (several timesteps x several samples, as in Q-Diffusion). A
candidate then only gathers rows of these tables:
- `w_clip[path]` (B, C_out): per-channel clipping of each kernel, the MSE-optimal fraction of abs-max;
- `w_round[path]` (B, ceil(K / 8)) uint8: learned rounding (AdaRound, `reconstruct`), one bit per kernel entry,
  packed: 1 rounds the entry up, 0 down. Empty: round to nearest;
- `a_range` (L, G, B, 2): [lo, hi] of each site's "a" operand for each timestep group, the shrunken min/max of least
  Lp error (`range_norm` p: 2 = MSE; a larger p weighs the few large clipping errors more, BRECQ uses 2.4; inf: the
  least largest error, min/max or one grid step in); sites matched by `unclipped` keep the calibration min/max at
  every bit-width from `unclipped_min_bits`; (per-step ranges as in TFMQ-DM; G = 1: one range for every t);
- `skip_range` (L, G, B, 2): the same for the skip part of a split input (`Site.split_at`: the concatenated
  skip connection of an up block's 1x1 shortcut, Q-Diffusion Sec. 4.3); zeros on other sites;
- `w_range` (L, G, B, 2): the same for the "w" operand of attention matmuls (k and v); zeros for conv/dense sites.
Group g holds the timesteps [group_starts[g], group_starts[g + 1]); a forward at timestep t reads `group_of(t)`.
A candidate with one step per group of the search space therefore reads group i at its step in group i.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict
from tqdm.auto import tqdm

from tmpq_jax import checkpoint
from tmpq_jax.quant.fake_quant import PASSTHROUGH_BITS, check_bit_choices, qdq_asymmetric, qdq_symmetric
from tmpq_jax.quant.sites import SiteTable, kernel_key, make_interceptor

WEIGHT_CLIP_GRID = np.linspace(1.0, 0.5, 21)  # descending: ties keep the widest range
ACT_CLIP_GRID = np.linspace(1.0, 0.2, 33)
SAMPLES_PER_BATCH = 2048  # values kept per operand and calibration batch
SAMPLES_PER_SITE = 16384  # values kept per operand and group in the end (memory: L x G x 3 x 16384 floats)
RANGE_TABLES = ("a_range", "skip_range", "w_range")


def group_of(group_starts: jax.Array, t: jax.Array) -> jax.Array:
    """The timestep group of each t (int32, shape of t): the last g with group_starts[g] <= t (group 0 below the
    first start)."""
    g = jnp.searchsorted(jnp.asarray(group_starts), jnp.asarray(t, jnp.int32), side="right") - 1
    return jnp.maximum(g, 0).astype(jnp.int32)


@flax.struct.dataclass
class QuantTables:
    table_bits: jax.Array  # (B,) int32, ascending: every bit-width a candidate may use
    w_clip: dict  # site path -> (B, C_out)
    a_range: jax.Array  # (L, G, B, 2)
    w_range: jax.Array  # (L, G, B, 2); zeros for conv/dense sites
    skip_range: jax.Array  # (L, G, B, 2); zeros for sites whose input is not split
    group_starts: jax.Array  # (G,) int32 ascending; (1,) [0]: one range for every timestep
    w_round: dict  # site path -> (B, ceil(K / 8)) uint8 packed rounding bits; {} = round to nearest

    @classmethod
    def create(cls, table_bits, w_clip, a_range, w_range=None, skip_range=None, group_starts=(0,), w_round=None):
        """Tables from arrays; `a_range` etc. as (L, G, B, 2), or (L, B, 2) for one group."""
        def four(x):
            x = jnp.asarray(x, jnp.float32)
            return x[:, None] if x.ndim == 3 else x

        a_range = four(a_range)
        zeros = jnp.zeros_like(a_range)
        return cls(jnp.asarray(table_bits, jnp.int32), dict(w_clip), a_range,
                   zeros if w_range is None else four(w_range), zeros if skip_range is None else four(skip_range),
                   jnp.asarray(group_starts, jnp.int32), dict(w_round or {}))

    @property
    def num_groups(self) -> int:
        return int(self.group_starts.shape[0])

    def group_of(self, t: jax.Array) -> jax.Array:
        """The timestep group of each t (int32, shape of t): the last g with group_starts[g] <= t (group 0 below
        the first start)."""
        return group_of(self.group_starts, t)

    def bit_row(self, bits: jax.Array) -> jax.Array:
        """Row index of each bit-width in `table_bits` (int32, shape of `bits`); jittable and vmappable.

        - a calibrated bit-width: its row;
        - a bit-width < 16 the tables were not calibrated for: `len(table_bits)`, one past the last row. Gather with
          `take_row`, which fills that row with NaN, so the candidate's quantizers and outputs are NaN (the search
          scores NaN as infeasible) instead of silently using another bit-width's row. Plain indexing would clamp it
          to the last row: do not index tables with `bit_row` directly;
        - a bit-width >= 16 not in the table: row 0. QDQ passes such operands through exactly, so the row's content
          is never used.
        Concrete bits are checked up front (with a message) by `engine.check_candidate_bits`.
        """
        bits = jnp.asarray(bits)
        hit = self.table_bits == bits[..., None]
        row = jnp.argmax(hit, axis=-1).astype(jnp.int32)
        missing = ~jnp.any(hit, axis=-1) & (bits < PASSTHROUGH_BITS)
        return jnp.where(missing, jnp.int32(self.table_bits.shape[0]), row)

    @staticmethod
    def take_row(table: jax.Array, rows: jax.Array, axis: int = 0) -> jax.Array:
        """`table` indexed by `rows` (from `bit_row`) along `axis`; the out-of-range row of an uncalibrated
        bit-width reads as NaN."""
        return jnp.take(table, rows, axis=axis, mode="fill", fill_value=jnp.nan)


def first_nonfinite(sites: SiteTable, table_bits, w_clip: dict, a_range=None, w_range=None,
                    skip_range=None) -> str | None:
    """The first non-finite table entry, or None: "<table> of site '<path>' (i of L)[, timestep group g] at <b>
    bits holds nan".

    Sites are scanned in order, and per site w_clip, a_range, skip_range, w_range. Rows are named by their
    bit-width. Range tables are (L, G, B, 2), or (L, B, 2).
    """
    tb = np.asarray(table_bits).reshape(-1).tolist()
    stacked = {name: np.asarray(arr) for name, arr in (("a_range", a_range), ("skip_range", skip_range),
                                                      ("w_range", w_range)) if arr is not None}
    if all(np.all(np.isfinite(np.asarray(v))) for v in [*w_clip.values(), *stacked.values()]):
        return None

    def describe(name, arr, where):
        arr = np.asarray(arr)
        bad = ~np.isfinite(arr)
        if not bad.any():
            return None
        first = tuple(int(k) for k in np.argwhere(bad)[0]) if arr.ndim else ()
        grouped = name != "w_clip" and arr.ndim == 3  # (G, B, 2) of one site
        row = (first[1] if grouped else first[0]) if first else 0
        at = f"{tb[row]} bits" if row < len(tb) else f"row {row}"
        group = f", timestep group {first[0]}," if grouped else ""
        return f"{name} of {where}{group} at {at} holds {arr[first]}"

    site_of = {s.path: i for i, s in enumerate(sites.sites)}
    for i, s in enumerate(sites.sites):
        where = f"site {s.path!r} ({i + 1} of {len(sites)})"
        per_site = [("w_clip", w_clip[s.path])] if s.path in w_clip else []
        per_site += [(name, arr[i]) for name, arr in stacked.items() if i < len(arr)]
        for name, arr in per_site:
            if found := describe(name, arr, where):
                return found
    # entries tied to no site (only in a malformed file)
    for k, v in w_clip.items():
        if k not in site_of and (found := describe("w_clip", v, f"entry {k!r}")):
            return found
    for name, arr in stacked.items():
        for i in range(len(sites), len(arr)):
            if found := describe(name, arr[i], f"extra site row {i}"):
                return found
    return "a non-finite entry"  # unreachable unless the shapes are malformed


def check_finite_tables(sites: SiteTable, table_bits, w_clip, a_range=None, w_range=None, skip_range=None) -> None:
    bad = first_nonfinite(sites, table_bits, w_clip, a_range, w_range, skip_range)
    if bad:
        raise ValueError(f"calibration produced a non-finite quantizer parameter: {bad}. The params or the model's "
                         f"outputs on the calibration inputs contain NaN/inf: check the params (e.g. a diverged "
                         f"checkpoint) and the model's outputs for NaN, then recalibrate")


def table_bits_for(sites: SiteTable, bit_choices) -> np.ndarray:
    fixed = [b for s in sites.sites for b in (s.fixed_w_bits, s.fixed_a_bits) if b]
    return np.unique(np.concatenate([check_bit_choices(bit_choices), np.asarray(fixed, np.int32)])).astype(np.int32)


def check_group_starts(group_starts) -> np.ndarray:
    g = np.asarray(group_starts)
    if g.ndim != 1 or not len(g) or not np.issubdtype(g.dtype, np.integer) or np.any(np.diff(g) <= 0) or g[0] < 0:
        raise ValueError(f"group_starts must be a non-empty ascending list of integer timesteps >= 0, got "
                         f"{g.tolist()}")
    return g.astype(np.int32)


def host_group_of(group_starts, t) -> np.ndarray:
    """`QuantTables.group_of` on the host (numpy)."""
    return np.maximum(np.searchsorted(np.asarray(group_starts), np.asarray(t), side="right") - 1, 0)


# --- weights ------------------------------------------------------------------------------------------------------


@jax.jit
def _weight_clip_search(w2d: jax.Array, bits: jax.Array) -> jax.Array:
    """MSE-optimal per-channel clip for each bit-width: w2d (rows, C), bits (B,) -> (B, C)."""
    absmax = jnp.max(jnp.abs(w2d), axis=0)
    grid = jnp.asarray(WEIGHT_CLIP_GRID, w2d.dtype)

    def per_bit(b):
        err = jax.vmap(lambda a: jnp.sum((qdq_symmetric(w2d, a * absmax, b) - w2d) ** 2, axis=0))(grid)  # (G, C)
        return grid[jnp.argmin(err, axis=0)] * absmax

    return jax.lax.map(per_bit, bits)


def calibrate_weights(params: Any, sites: SiteTable, table_bits) -> dict:
    flat = flatten_dict(flax.core.unfreeze(params))
    bits = jnp.asarray(table_bits, jnp.int32)
    out = {}
    for s in tqdm(sites.weight_sites, desc="calibrate weights", unit="site", mininterval=2.0):
        key = kernel_key(s.path)
        if key not in flat:
            raise KeyError(f"site {s.path!r} has no kernel at params[{'/'.join(key)}]; do params match the model?")
        w = jnp.asarray(flat[key], jnp.float32)
        out[s.path] = _weight_clip_search(w.reshape(-1, w.shape[-1]), bits)
    return out


# --- activations --------------------------------------------------------------------------------------------------


def _summary(x: jax.Array, key: jax.Array):
    """(min, max, a fixed-seed random subsample). A strided subsample would keep one channel of an NHWC tensor."""
    flat = x.reshape(-1).astype(jnp.float32)
    idx = jax.random.randint(key, (SAMPLES_PER_BATCH,), 0, flat.shape[0])
    return jnp.min(flat), jnp.max(flat), flat[idx]


def split_parts(site, x):
    """The parts of a site's "a" operand that get their own range: (up path, skip) along the channels of a split
    input (`Site.split_at`), else (x,)."""
    s = getattr(site, "split_at", 0)
    return (x[..., :s], x[..., s:]) if s else (x,)


def make_stats_fn(apply_fn: Callable, sites: SiteTable | None = None):
    """jit(salt, params, *inputs) -> {"path|role": (min, max, subsample)} for every site operand; role 'a', 'w'
    and, for the split inputs of `sites`, 'skip' (the skip part; 'a' is then the up-path part).

    A module called several times per forward (its MACs count every call, `discover_sites`) shares one quantizer, so
    its statistics cover every call: min and max over all of them, and a subsample of each call's operand."""
    by_path = {s.path: s for s in sites.sites} if sites is not None else {}

    @jax.jit
    def stats(salt, params, *inputs):
        found: dict[str, list] = {}

        def observe(name, x):
            calls = found.setdefault(name, [])
            key = jax.random.fold_in(jax.random.key(zlib.crc32(name.encode())), salt)
            calls.append(_summary(x, key if not calls else jax.random.fold_in(key, len(calls))))

        def operand_fn(path, role, x):
            parts = split_parts(by_path[path], x) if role == "a" and path in by_path else (x,)
            for name, part in zip((role, "skip"), parts):
                observe(f"{path}|{name}", part)
            return x

        with nn.intercept_methods(make_interceptor(operand_fn)):
            apply_fn(params, *inputs)
        return {name: (jnp.min(jnp.stack([c[0] for c in calls])), jnp.max(jnp.stack([c[1] for c in calls])),
                       jnp.concatenate([c[2] for c in calls]))
                for name, calls in found.items()}

    return stats


def check_range_norm(p) -> float:
    """The Lp norm of the activation range search: a number >= 1 (inf: the least largest error)."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not p >= 1:
        raise ValueError(f"range_norm must be a number >= 1 (2 = MSE, a larger p clips less), got {p!r}")
    return float(p)


def unclipped_sites(sites: SiteTable, patterns: Sequence[str]) -> np.ndarray:
    """(L,) bool: the sites whose path matches one of `patterns` (re.search); ValueError names a malformed regex."""
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except (re.error, TypeError) as e:
            raise ValueError(f"unclipped site pattern {p!r} is not a regular expression: {e}") from e
    return np.array([any(r.search(s.path) for r in compiled) for s in sites.sites], bool)


def lp_error(err: jax.Array, p: float) -> jax.Array:
    """mean |err|^p, or max |err| for p = inf (the order of these values is that of the Lp norm)."""
    err = jnp.abs(err)
    return jnp.max(err) if np.isinf(p) else jnp.mean(err ** p)


@jax.jit(static_argnames="p")
def _act_range_search(values: jax.Array, lo: jax.Array, hi: jax.Array, bits: jax.Array, p: float = 2.0) -> jax.Array:
    """[a*lo, a*hi] of least Lp error per bit-width over the grid ACT_CLIP_GRID: -> (B, 2)."""
    grid = jnp.asarray(ACT_CLIP_GRID, values.dtype)

    def per_bit(b):
        err = jax.vmap(lambda a: lp_error(qdq_asymmetric(values, a * lo, a * hi, b) - values, p))(grid)
        best = grid[jnp.argmin(err)]
        return jnp.stack([best * lo, best * hi])

    return jax.lax.map(per_bit, bits)


def calibrate(apply_fn: Callable, params: Any, sites: SiteTable, batches: Iterable[tuple], bit_choices,
              seed: int = 0, num_batches: int | None = None, group_starts=(0,), range_norm: float = 2.0,
              unclipped: Sequence[str] = (), unclipped_min_bits: int = 2) -> QuantTables:
    """Calibrate all tables. `batches` yields model inputs, e.g. (x_t, t, labels) from `trajectory_batches`.

    `group_starts` (G,): the timestep groups of the activation ranges. With G > 1 the inputs' second entry is the
    timestep, and each batch must lie in one group (`group_batches`); every group needs a batch. `range_norm`: the
    Lp error the activation ranges minimise (`check_range_norm`). `unclipped`: regexes (re.search on site paths) of
    the sites whose ranges are the min/max over all calibration inputs at every bit-width, no clipping: the rare
    large values a clipped range loses (and the range search's subsample may not hold) can carry the output, e.g.
    the GEGLU output feeding a transformer's ff/net_2 (README "Calibration"); only at bit-widths >=
    `unclipped_min_bits` (below it their ranges are searched like the others').
    Raises ValueError naming the first site, table and bit-width whose parameter is not finite (NaN/inf params or
    model outputs); the weight clips are checked before the activation pass, everything again at the end.
    """
    table_bits = table_bits_for(sites, bit_choices)
    starts = check_group_starts(group_starts)
    range_norm = check_range_norm(range_norm)
    keep = unclipped_sites(sites, unclipped)
    if isinstance(unclipped_min_bits, bool) or not isinstance(unclipped_min_bits, (int, np.integer)) or \
            not 2 <= unclipped_min_bits <= 16:
        raise ValueError(f"unclipped_min_bits must be a bit-width in [2, 16], got {unclipped_min_bits!r}")
    w_clip = calibrate_weights(params, sites, table_bits)
    check_finite_tables(sites, table_bits, w_clip)  # fail before the costly activation pass

    stats_fn = make_stats_fn(apply_fn, sites)
    acc: dict[tuple[str, int], list] = {}
    for i, inputs in enumerate(tqdm(batches, total=num_batches, desc="calibrate activations", unit="batch",
                                    mininterval=2.0)):
        g = 0
        if len(starts) > 1:
            groups = np.unique(host_group_of(starts, inputs[1]))
            if len(groups) != 1:
                raise ValueError(f"calibration batch {i} mixes timestep groups {groups.tolist()} (group starts "
                                 f"{starts.tolist()}); batch the inputs per group (quant.group_batches)")
            g = int(groups[0])
        salt = jnp.uint32((seed * 1_000_003 + i) % 2**32)
        for k, (mn, mx, sub) in jax.device_get(stats_fn(salt, params, *inputs)).items():
            a = acc.setdefault((k, g), [np.inf, -np.inf, []])
            a[0], a[1] = float(np.minimum(a[0], mn)), float(np.maximum(a[1], mx))  # NaN propagates
            a[2].append(np.asarray(sub))
    rng = np.random.default_rng(seed)
    bits = jnp.asarray(table_bits)
    shape = (len(sites), len(starts), len(table_bits), 2)
    ranges = {name: np.zeros(shape, np.float32) for name in RANGE_TABLES}
    for i, s in enumerate(sites.sites):
        roles = [("a", "a_range")] + ([("skip", "skip_range")] if s.split_at else []) + \
                ([] if s.has_weights else [("w", "w_range")])
        for role, table in roles:
            for g in range(len(starts)):
                if (f"{s.path}|{role}", g) not in acc:
                    where = "" if len(starts) == 1 else f" at timesteps of group {g} (from t = {starts[g]})"
                    raise RuntimeError(f"site {s.path!r} operand {role!r} was never reached during "
                                       f"calibration{where}")
                mn, mx, subs = acc[(f"{s.path}|{role}", g)]
                vals = np.concatenate(subs)
                vals = rng.choice(vals, SAMPLES_PER_SITE, replace=len(vals) < SAMPLES_PER_SITE)
                ranges[table][i, g] = np.asarray(_act_range_search(jnp.asarray(vals), jnp.float32(mn),
                                                                   jnp.float32(mx), bits, range_norm))
                if keep[i]:
                    ranges[table][i, g, table_bits >= unclipped_min_bits] = [mn, mx]
    check_finite_tables(sites, table_bits, w_clip, ranges["a_range"], ranges["w_range"], ranges["skip_range"])
    return QuantTables.create(table_bits, w_clip, ranges["a_range"], ranges["w_range"], ranges["skip_range"], starts)


def trajectory_batches(inputs: tuple, batch_size: int):
    """Split flattened calibration inputs (x (M, ...), t (M,), labels (M,)) into batches."""
    m = inputs[0].shape[0]
    for i in range(0, m, batch_size):
        yield tuple(a[i:i + batch_size] for a in inputs)


def group_batches(inputs: tuple, batch_size: int, group_starts):
    """`trajectory_batches` per timestep group: every batch holds inputs of one group (inputs[1] is t). A group's
    short last batch is filled up with its first inputs, so that every batch has one shape (one compiled program;
    repeated inputs leave min and max unchanged)."""
    groups = host_group_of(check_group_starts(group_starts), np.asarray(inputs[1]))
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        size = min(batch_size, len(idx))
        idx = np.concatenate([idx, idx[:(-len(idx)) % size]])
        yield from trajectory_batches(tuple(np.asarray(a)[idx] for a in inputs), size)


def num_group_batches(t, batch_size: int, group_starts) -> int:
    groups = host_group_of(check_group_starts(group_starts), np.asarray(t))
    return int(sum(-(-int(np.sum(groups == g)) // batch_size) for g in np.unique(groups)))


# --- save / load --------------------------------------------------------------------------------------------------


def save_tables(path: str | Path, tables: QuantTables, sites: SiteTable, meta: dict | None = None) -> str:
    tree = {"table_bits": tables.table_bits, "w_clip": _escape(tables.w_clip), "a_range": tables.a_range,
            "w_range": tables.w_range, "skip_range": tables.skip_range, "group_starts": tables.group_starts,
            "w_round": _escape(tables.w_round), "site_paths": np.frombuffer("\n".join(sites.paths).encode(), np.uint8)}
    sha = checkpoint.save_tree(path, tree)
    checkpoint.write_json(Path(path).with_suffix(".json"), {"sites": len(sites), "table_bits": tables.table_bits,
                                                           "group_starts": tables.group_starts,
                                                           "learned_rounding": bool(tables.w_round),
                                                           "sha256": sha, **(meta or {})})
    return sha


def _escape(d: dict) -> dict:
    return {k.replace("/", "|"): v for k, v in d.items()}


def _unescape(d) -> dict:
    return {k.replace("|", "/"): jnp.asarray(v) for k, v in (d or {}).items()}


def packed_size(site) -> int:
    """Bytes of one bit-width's packed rounding bits of a kernel: ceil(K / 8), K its number of entries."""
    return -(-int(np.prod(site.kernel_shape)) // 8)


def table_shape_error(tables: QuantTables, sites: SiteTable) -> str | None:
    """What is wrong with the tables' shapes for these sites, or None: table_bits (B,), group_starts (G,) ascending,
    the range tables (L, G, B, 2), w_clip[path] (B, C_out) for exactly the sites with weights, and w_round empty or
    (B, ceil(K / 8)) uint8 for exactly those sites."""
    tb = np.asarray(tables.table_bits)
    if tb.ndim != 1 or not len(tb):
        return f"table_bits has shape {tb.shape}, expected (B,) with B >= 1"
    gs = np.asarray(tables.group_starts)
    if gs.ndim != 1 or not len(gs) or np.any(np.diff(gs) <= 0):
        return f"group_starts is {gs.tolist()}, expected (G,) ascending timesteps with G >= 1"
    n_bits, want = len(tb), (len(sites), len(gs), len(tb), 2)
    for name in RANGE_TABLES:
        shape = tuple(np.shape(getattr(tables, name)))
        if shape != want:
            return f"{name} has shape {shape}, expected {want} (sites, timestep groups, bit-widths, [lo, hi])"
    weights = {s.path: s for s in sites.weight_sites}
    for name in ("w_clip", "w_round"):
        entries = getattr(tables, name)
        if name == "w_round" and not entries:
            continue
        if set(entries) != set(weights):
            extra, missing = sorted(set(entries) - set(weights)), sorted(set(weights) - set(entries))
            return f"{name} entries do not match the weight sites (missing {missing[:3]}, unexpected {extra[:3]})"
    for p, site in weights.items():
        shape = tuple(np.shape(tables.w_clip[p]))
        if shape != (n_bits, site.out_channels):
            return f"w_clip of site {p!r} has shape {shape}, expected {(n_bits, site.out_channels)}"
        if tables.w_round:
            r = tables.w_round[p]
            if tuple(np.shape(r)) != (n_bits, packed_size(site)) or np.asarray(r).dtype != np.uint8:
                return (f"w_round of site {p!r} is {np.asarray(r).dtype} {tuple(np.shape(r))}, expected uint8 "
                        f"{(n_bits, packed_size(site))}")
    return None


def load_tables(path: str | Path, sites: SiteTable, bit_choices=None) -> QuantTables:
    """Load tables and check they were calibrated for these sites, are finite (and cover `bit_choices`).

    Raises `checkpoint.CheckpointError` on any mismatch, naming the first non-finite site, table and bit-width.
    """
    state = checkpoint.load_tree(path)
    try:
        paths = tuple(bytes(np.asarray(state["site_paths"], np.uint8)).decode().split("\n"))
        tables = QuantTables(jnp.asarray(state["table_bits"]), _unescape(state["w_clip"]),
                             *(jnp.asarray(state[k]) for k in ("a_range", "w_range", "skip_range", "group_starts")),
                             _unescape(state.get("w_round")))
    except (KeyError, TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"quantization tables {str(path)!r} are malformed or from an older "
                                         f"version (missing {e}); recalibrate") from e
    if paths != sites.paths:
        raise checkpoint.CheckpointError(f"quantization tables {str(path)!r} were calibrated for other sites "
                                         f"({len(paths)} sites vs the model's {len(sites)}); recalibrate")
    if bad := table_shape_error(tables, sites):
        raise checkpoint.CheckpointError(f"quantization tables {str(path)!r} are malformed: {bad}; recalibrate")
    try:
        bad = first_nonfinite(sites, tables.table_bits, tables.w_clip, tables.a_range, tables.w_range,
                              tables.skip_range)
    except (IndexError, TypeError) as e:
        raise checkpoint.CheckpointError(f"quantization tables {str(path)!r} are malformed: {e}") from e
    if bad:
        raise checkpoint.CheckpointError(f"quantization tables {str(path)!r} hold a non-finite value: {bad}. The file "
                                         f"is damaged or was calibrated from a model with NaN outputs; recalibrate "
                                         f"(and check the model's params and outputs for NaN)")
    if bit_choices is not None:
        missing = sorted(set(table_bits_for(sites, bit_choices).tolist()) - set(np.asarray(tables.table_bits).tolist()))
        if missing:
            raise checkpoint.CheckpointError(f"quantization tables {str(path)!r} lack bit-widths {missing}; "
                                             f"they hold {np.asarray(tables.table_bits).tolist()}; recalibrate")
    return tables
