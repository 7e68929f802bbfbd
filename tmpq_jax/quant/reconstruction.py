"""Block reconstruction of the shared per-bit tables: learned weight rounding and activation step sizes.

For every block (a resnet, an attention/transformer block, and every site outside them, e.g. the first and last
conv, as its own block) and every bit-width of the tables, learn
- the weight rounding of each kernel: AdaRound's rectified sigmoid h(V) = clip(sigmoid(V) (zeta - gamma) + gamma,
  0, 1) with zeta = 1.1, gamma = -0.1 (Nagel et al. 2020, eq. 23), regularised toward {0, 1} by
  reg * sum(1 - |2h - 1|^beta), beta annealed from 20 to 2 after a warm-up (eq. 24; BRECQ's schedule);
- a step size of each activation operand: a factor exp(s) on its calibrated per-group range, through the
  straight-through rounding of `qdq_asymmetric` (LSQ, Esser et al. 2020),
minimising the block's output error against full precision on the calibration inputs (BRECQ, Li et al. 2021,
with FP block inputs). All bit-widths of a block train in one program with optax's Adam: vmapped over the
bit-width lanes on accelerators, the lanes unrolled on CPU (`ReconSettings.lanes`).

The tables then hold what a candidate needs to reproduce the learned quantizers: the rounding bits, packed 8 per
byte (`QuantTables.w_round`), and the learned ranges (`a_range`, `skip_range`, `w_range`). A lane trains every
searched operand at its bit-width; an operand pinned by a rule keeps its pinned row, learned in its own lane.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict
from tqdm.auto import tqdm

from tmpq_jax.quant.calibrate import QuantTables
from tmpq_jax.quant.engine import site_operand_fn
from tmpq_jax.quant.fake_quant import PASSTHROUGH_BITS, qdq_symmetric_rounded
from tmpq_jax.quant.sites import SiteTable, kernel_key, make_interceptor, module_path

ZETA, GAMMA = 1.1, -0.1


@dataclasses.dataclass(frozen=True)
class ReconSettings:
    """Iterations per block, batch (inputs of one timestep group per iteration), Adam learning rates of the rounding
    variables and the step sizes (the latter cosine-decayed), the rounding regulariser's weight, warm-up fraction
    and beta range. The defaults suit a 2-core CPU on the embedded model; BRECQ uses 20k iterations at batch 32."""

    iters: int = 80
    batch: int = 16
    lr_round: float = 1e-2
    lr_act: float = 4e-3
    reg: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    chunk: int = 40  # iterations per compiled call (progress granularity)
    lanes: str = "auto"  # bit-width lanes: 'vmap', 'unroll' (one after another in the program), 'auto': unroll on CPU
    seed: int = 0

    def check(self) -> "ReconSettings":
        checks = [("iters", self.iters >= 1, "an integer >= 1"), ("batch", self.batch >= 1, "an integer >= 1"),
                  ("lr_round", self.lr_round > 0, "> 0"), ("lr_act", self.lr_act >= 0, ">= 0"),
                  ("reg", self.reg >= 0, ">= 0"), ("warmup", 0 <= self.warmup < 1, "in [0, 1)"),
                  ("chunk", self.chunk >= 1, "an integer >= 1"),
                  ("lanes", self.lanes in ("auto", "vmap", "unroll"), "'auto', 'vmap' or 'unroll'")]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"reconstruction setting {name}={getattr(self, name)!r} is invalid; valid: {valid}")
        return self


@dataclasses.dataclass(frozen=True)
class Block:
    """A module reconstructed as one unit: its path and the indices of the sites inside it."""

    path: str
    sites: tuple[int, ...]


# --- blocks -------------------------------------------------------------------------------------------------------


def _block_classes() -> tuple[type, ...]:
    from diffusers.models.attention_flax import FlaxTransformer2DModel
    from diffusers.models.resnet_flax import FlaxResnetBlock2D

    return FlaxResnetBlock2D, FlaxTransformer2DModel


BLOCK_CLASSES: list[type] = []


def is_block(module: nn.Module) -> bool:
    """diffusers' Flax resnet and transformer blocks, and modules that set `reconstruction_block = True`."""
    if getattr(module, "reconstruction_block", False) is True:
        return True
    if not BLOCK_CLASSES:
        BLOCK_CLASSES.extend(_block_classes())
    return isinstance(module, tuple(BLOCK_CLASSES))


def find_blocks(apply_fn: Callable, params_shapes: Any, example_inputs, sites: SiteTable) -> tuple[Block, ...]:
    """The outermost block modules that hold sites, and one block per remaining site (an attention's two matmul
    sites form one block at the attention module), in call order."""
    paths: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and is_block(context.module):
            p = module_path(context.module)
            if not any(p == q or p.startswith(q + "/") for q in paths):
                paths.append(p)
        return next_fun(*args, **kwargs)

    def run(p, *inputs):
        with nn.intercept_methods(interceptor):
            return apply_fn(p, *inputs)

    jax.eval_shape(run, params_shapes, *example_inputs)
    members: dict[str, list[int]] = {}
    for i, s in enumerate(sites.sites):
        owner = next((p for p in paths if s.path.startswith(p + "/")), None)
        if owner is None:
            owner = s.path if s.has_weights else s.path.rsplit("/", 1)[0]
        members.setdefault(owner, []).append(i)
    return tuple(Block(p, tuple(ix)) for p, ix in members.items())


# --- inputs -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BlockInputs:
    """A block's recorded calls: the unbound module, its (args, kwargs) structure with the non-array leaves, the
    array leaves stacked over calibration inputs (N, ...) and each input's timestep group (N,)."""

    module: nn.Module
    treedef: Any
    static: list  # per leaf: None for an array leaf, else the leaf value
    arrays: list[np.ndarray]
    groups: np.ndarray

    def call_args(self, arrays):
        it = iter(arrays)
        leaves = [next(it) if s is None else s for s in self.static]
        return jax.tree.unflatten(self.treedef, leaves)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))  # tracers are jax.Array instances


def capture_inputs(apply_fn: Callable, params: Any, blocks: Iterable[Block], batches: Iterable[tuple],
                   group_of: Callable[[np.ndarray], int]) -> dict[str, BlockInputs]:
    """Record every block's call arguments on FP forwards of `batches` (model inputs of one timestep group each;
    `group_of(inputs)` names it). A block called several times per forward records every call."""
    wanted = {b.path for b in blocks}
    meta: dict[str, tuple] = {}

    @jax.jit
    def record(params, *inputs):
        out: dict[str, list] = {}

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__":
                p = module_path(context.module)
                if p in wanted:
                    leaves, treedef = jax.tree.flatten((args, kwargs))
                    meta.setdefault(p, (context.module.clone(parent=None), treedef,
                                        [None if _is_array(x) else x for x in leaves]))
                    out.setdefault(p, []).append([x for x in leaves if _is_array(x)])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            apply_fn(params, *inputs)
        return {p: [jnp.concatenate(parts) for parts in zip(*calls)] for p, calls in out.items()}

    acc: dict[str, list] = {}
    groups: dict[str, list] = {}
    for inputs in batches:
        got = jax.device_get(record(params, *inputs))
        g = group_of(inputs)
        for p, arrays in got.items():
            acc.setdefault(p, []).append(arrays)
            groups.setdefault(p, []).append(np.full(len(arrays[0]), g, np.int32))
    missing = sorted(wanted - set(acc))
    if missing:
        raise RuntimeError(f"blocks {missing[:3]} were never called on the calibration inputs")
    return {p: BlockInputs(*meta[p], [np.concatenate(parts) for parts in zip(*acc[p])], np.concatenate(groups[p]))
            for p in acc}


def _subtree(tree: dict, path: str) -> dict:
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _relative(block: Block, site_path: str) -> str:
    return "" if site_path == block.path else site_path[len(block.path) + 1:]


# --- one block ----------------------------------------------------------------------------------------------------


def rectified_sigmoid(v: jax.Array) -> jax.Array:
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _init_rounding(w: jax.Array, clip: jax.Array, bits: jax.Array) -> jax.Array:
    """V with h(V) = frac(w / scale): training starts at the unrounded weight (AdaRound's initialisation)."""
    qmax = jnp.exp2(bits.astype(jnp.float32) - 1.0) - 1.0
    scale = jnp.maximum(clip, jnp.finfo(jnp.float32).tiny) / qmax
    frac = w / scale - jnp.floor(w / scale)
    return -jnp.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)


class BlockProblem:
    """The reconstruction of one block over the tables' bit-widths below 16 (the lanes)."""

    def __init__(self, block: Block, inputs: BlockInputs, params: Any, sites: SiteTable, tables: QuantTables):
        self.block, self.inputs, self.sites, self.tables = block, inputs, sites, tables
        self.sub = _subtree(params, block.path)
        tb = np.asarray(tables.table_bits)
        self.lane_rows = np.flatnonzero(tb < PASSTHROUGH_BITS).astype(np.int32)
        self.lane_bits = jnp.asarray(tb[self.lane_rows], jnp.int32)
        self.weight_sites = [i for i in block.sites if sites.sites[i].has_weights]
        self.fixed_w = jnp.asarray([s.fixed_w_bits for s in sites.sites], jnp.int32)
        self.fixed_a = jnp.asarray([s.fixed_a_bits for s in sites.sites], jnp.int32)
        self.in_block = jnp.zeros(len(sites), bool).at[jnp.asarray(block.sites)].set(True)

    # lanes: every searched operand at the lane's bit-width, pinned operands at their bits
    def lane_site_bits(self, lane_bit):
        return (jnp.where(self.fixed_w > 0, self.fixed_w, lane_bit), jnp.where(self.fixed_a > 0, self.fixed_a,
                                                                                lane_bit))

    def kernel(self, i: int):
        p = _relative(self.block, self.sites.sites[i].path)
        return _subtree(self.sub, p)["kernel"] if p else self.sub["kernel"]

    def init(self):
        """Learned variables, each with a leading lane axis: V per kernel, and log step factors (lanes, L) of the
        "a", "skip" and "w" operands (only this block's entries get gradients)."""
        def per_lane(lane_bit):
            wb, _ = self.lane_site_bits(lane_bit)
            v = {}
            for i in self.weight_sites:
                s = self.sites.sites[i]
                row = self.tables.bit_row(wb[i])
                v[s.path] = _init_rounding(self.kernel(i).astype(jnp.float32), self.tables.w_clip[s.path][row],
                                           wb[i])
            return v

        n = len(self.lane_rows)
        zeros = jnp.zeros((n, len(self.sites)), jnp.float32)
        return {"V": jax.vmap(per_lane)(self.lane_bits), "a": zeros, "skip": zeros, "w": zeros}

    def quantized_kernels(self, learned, lane_bit, hard: bool) -> dict:
        """{site path: fake-quantized kernel} of this block's weight sites under lane `lane_bit` (AdaRound, eq. 2)."""
        wb, _ = self.lane_site_bits(lane_bit)
        learn_w = (self.fixed_w == 0) | (self.fixed_w == lane_bit)
        out = {}
        for i in self.weight_sites:
            s = self.sites.sites[i]
            w = self.kernel(i)
            clip = self.tables.w_clip[s.path][self.tables.bit_row(wb[i])]
            v = learned["V"][s.path]
            up = (v >= 0).astype(w.dtype) if hard else rectified_sigmoid(v)
            qmax = jnp.exp2(wb[i].astype(w.dtype) - 1.0) - 1.0
            scaled = w / (jnp.maximum(clip, jnp.finfo(w.dtype).tiny) / qmax)
            nearest = (scaled - jnp.floor(scaled) >= 0.5).astype(w.dtype)
            out[s.path] = qdq_symmetric_rounded(w, clip, wb[i], jnp.where(learn_w[i], up, nearest))
        return out

    def forward(self, learned, lane_bit, arrays, group, hard: bool):
        """The block's output with lane `lane_bit`'s quantizers (one lane of `learned`) on one group's inputs."""
        wb, ab = self.lane_site_bits(lane_bit)
        learn_w = (self.fixed_w == 0) | (self.fixed_w == lane_bit)
        learn_a = (self.fixed_a == 0) | (self.fixed_a == lane_bit)
        sub = jax.tree.map(lambda x: x, flax.core.unfreeze(self.sub))  # a fresh nested dict to write kernels into
        for path, qw in self.quantized_kernels(learned, lane_bit, hard).items():
            rel = _relative(self.block, path)
            node = sub if not rel else _subtree(sub, rel)
            node["kernel"] = qw
        ranges = self.ranges(learned, wb, ab, learn_w, learn_a, group)
        base = site_operand_fn(self.sites, *ranges, ab, wb)
        prefix = self.block.path

        def operand_fn(path, role, x):
            return base(f"{prefix}/{path}" if path else prefix, role, x)

        with nn.intercept_methods(make_interceptor(operand_fn)):
            args, kwargs = self.inputs.call_args(arrays)
            return self.inputs.module.apply({"params": sub}, *args, **kwargs)

    def ranges(self, learned, wb, ab, learn_w, learn_a, group):
        """(a_range, w_range, skip_range) (L, 2) of one lane at `group`: the table rows times the learned factors."""
        idx = jnp.arange(len(self.sites))
        ar, wr = self.tables.bit_row(ab), self.tables.bit_row(wb)

        def scaled(table, rows, factor, mask):
            r = table[idx, group, rows]
            return r * jnp.where(mask & self.in_block, jnp.exp(factor), 1.0)[:, None]

        return (scaled(self.tables.a_range, ar, learned["a"], learn_a),
                scaled(self.tables.w_range, wr, learned["w"], learn_w),
                scaled(self.tables.skip_range, ar, learned["skip"], learn_a))

    def fp_forward(self, arrays):
        args, kwargs = self.inputs.call_args(arrays)
        return self.inputs.module.apply({"params": self.sub}, *args, **kwargs)


def output_error(out, target) -> jax.Array:
    """BRECQ's reconstruction loss: squared error summed over channels (last axis), averaged over the rest."""
    return jnp.mean(jnp.sum(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1))


def rounding_regulariser(v: dict, beta) -> jax.Array:
    return sum(jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(x) - 1.0) ** beta) for x in jax.tree.leaves(v))


def _batch_plan(groups: np.ndarray, iters: int, batch: int, rng: np.random.Generator):
    """Per iteration one timestep group (cycled in random order) and `batch` indices of inputs from it."""
    uniq = np.unique(groups)
    order = np.concatenate([rng.permutation(uniq) for _ in range(-(-iters // len(uniq)))])[:iters]
    idx = np.stack([rng.choice(np.flatnonzero(groups == g), batch, replace=np.sum(groups == g) < batch)
                    for g in order])
    return idx.astype(np.int32), order.astype(np.int32)


def train_block(problem: BlockProblem, settings: ReconSettings, on_chunk: Callable[[int], None] | None = None):
    """Learned variables of one block (lanes leading), trained on its recorded inputs, and the reconstruction error
    (summed over lanes, soft rounding, without the regulariser) at every iteration."""
    s = settings
    learned = problem.init()
    labels = {"V": jax.tree.map(lambda _: "round", learned["V"]), "a": "act", "skip": "act", "w": "act"}
    opt = optax.multi_transform({"round": optax.adam(s.lr_round),
                                 "act": optax.adam(optax.cosine_decay_schedule(s.lr_act, s.iters))}, labels)
    opt_state = opt.init(learned)
    data = [jnp.asarray(a) for a in problem.inputs.arrays]
    warm = int(s.warmup * s.iters)
    # On CPU, vmapped per-lane kernels become grouped convolutions and convolutions inside loops (scan, lax.map)
    # leave the fast path: a 28x28x32 resnet step over 4 lanes took 1.6 s vmapped, 1.7 s lax.mapped and 0.08 s with
    # the lanes unrolled (2 cores). So the CPU unrolls the lanes, and iterations are a Python loop over one step.
    lanes = s.lanes if s.lanes != "auto" else ("unroll" if jax.devices()[0].platform == "cpu" else "vmap")

    def loss(learned, batch, group, step):
        target = jax.lax.stop_gradient(problem.fp_forward(batch))
        frac = jnp.clip((step - warm) / max(s.iters - warm, 1), 0.0, 1.0)
        beta = s.beta[0] + (s.beta[1] - s.beta[0]) * frac
        reg = jnp.where(step < warm, 0.0, s.reg)

        def lane(lv, lane_bit):
            rec = output_error(problem.forward(lv, lane_bit, batch, group, hard=False), target)
            return rec + reg * rounding_regulariser(lv["V"], beta), rec

        if lanes == "vmap":
            total, rec = jax.vmap(lane)(learned, problem.lane_bits)
        else:
            outs = [lane(jax.tree.map(lambda a: a[k], learned), problem.lane_bits[k])
                    for k in range(len(problem.lane_rows))]
            total, rec = (jnp.stack(v) for v in zip(*outs))
        return jnp.sum(total), jnp.sum(rec)

    @jax.jit
    def step(lv, st, i, g, it):
        batch = [jnp.take(a, i, axis=0) for a in data]
        (_, rec), grads = jax.value_and_grad(loss, has_aux=True)(lv, batch, g, it)
        updates, st = opt.update(grads, st, lv)
        return optax.apply_updates(lv, updates), st, rec

    rng = np.random.default_rng(s.seed + 7 * len(problem.block.path))
    idx, groups = _batch_plan(problem.inputs.groups, s.iters, s.batch, rng)
    losses = []
    for it in range(s.iters):
        learned, opt_state, value = step(learned, opt_state, idx[it], groups[it], jnp.int32(it))
        losses.append(value)
        if on_chunk is not None and ((it + 1) % s.chunk == 0 or it + 1 == s.iters):
            on_chunk((it + 1) - (it // s.chunk) * s.chunk)
    return learned, np.asarray(jax.device_get(losses))


def apply_learned(tables: QuantTables, problem: BlockProblem, learned) -> QuantTables:
    """The tables with this block's learned rounding bits and step factors written into its lanes' rows."""
    rows = problem.lane_rows
    w_round = dict(tables.w_round)
    for i in problem.weight_sites:
        path = problem.sites.sites[i].path
        up = np.asarray(learned["V"][path] >= 0)  # (lanes, *kernel)
        packed = np.asarray(w_round[path]).copy()
        packed[rows] = np.stack([np.packbits(u.reshape(-1)) for u in up])
        w_round[path] = jnp.asarray(packed)
    out = {}
    for table, key in (("a_range", "a"), ("skip_range", "skip"), ("w_range", "w")):
        arr = np.asarray(getattr(tables, table)).copy()
        factor = np.exp(np.asarray(learned[key]))  # (lanes, L); 0 (factor 1) outside the block and on pinned rows
        for lane, row in enumerate(rows):
            for i in problem.block.sites:
                arr[i, :, row] *= factor[lane, i]
        out[table] = jnp.asarray(arr)
    return tables.replace(w_round=w_round, **out)


def nearest_rounding(params: Any, sites: SiteTable, tables: QuantTables) -> dict:
    """Packed rounding bits that reproduce round-to-nearest (half up) for every weight site and bit row."""
    flat = flatten_dict(params)
    out = {}
    for s in sites.weight_sites:
        w = np.asarray(flat[kernel_key(s.path)], np.float32)
        rows = []
        for r, b in enumerate(np.asarray(tables.table_bits)):
            qmax = 2.0 ** (float(min(b, PASSTHROUGH_BITS)) - 1) - 1
            scale = np.maximum(np.asarray(tables.w_clip[s.path][r]), np.finfo(np.float32).tiny) / qmax
            x = w / scale
            rows.append(np.packbits(((x - np.floor(x)) >= 0.5).reshape(-1)))
        out[s.path] = jnp.asarray(np.stack(rows))
    return out


def reconstruct(apply_fn: Callable, params: Any, sites: SiteTable, tables: QuantTables, blocks: tuple[Block, ...],
                batches: Iterable[tuple], group_of: Callable, settings: ReconSettings = ReconSettings(),
                log: Callable[[str], None] = print) -> QuantTables:
    """Tables with learned rounding and step sizes for every block (module docstring). `batches`: model inputs of
    one timestep group each (`calibrate.group_batches`); `group_of(inputs)` names the group."""
    settings.check()
    captured = capture_inputs(apply_fn, params, blocks, batches, group_of)
    mem = sum(c.nbytes for c in captured.values())
    lanes = int(np.sum(np.asarray(tables.table_bits) < PASSTHROUGH_BITS))
    mode = settings.lanes if settings.lanes != "auto" else ("unrolled" if jax.devices()[0].platform == "cpu" else
                                                            "vmapped")
    log(f"reconstruction: {len(blocks)} blocks x {settings.iters} iterations x {lanes} bit-widths ({mode}), batch "
        f"{settings.batch}; memory: {mem / 2**20:,.0f} MiB of recorded block inputs on the host "
        f"({len(next(iter(captured.values())).groups)} inputs per block)")
    tables = tables.replace(w_round=tables.w_round or nearest_rounding(params, sites, tables))
    bar = tqdm(total=len(blocks) * settings.iters, desc="reconstruct blocks", unit="it", mininterval=2.0)
    t0 = time.time()
    for k, block in enumerate(blocks):
        problem = BlockProblem(block, captured[block.path], params, sites, tables)
        learned, _ = train_block(problem, settings, bar.update)
        tables = apply_learned(tables, problem, learned)
        if k + 1 in (2, len(blocks) // 3):  # each block compiles its own program: time goes by blocks
            rest = (time.time() - t0) / (k + 1) * (len(blocks) - k - 1)
            log(f"reconstruction: {k + 1} of {len(blocks)} blocks in {time.time() - t0:.0f} s; about "
                f"{math.ceil(rest / 60)} min to go")
    bar.close()
    return tables
