"""Hooked diffusers attention: `use_memory_efficient_attention` (query blocks) and `split_head_dim` give the same
sites, MACs, calibration tables and (fake-quantized) outputs as the plain path."""

import logging

import diffusers.utils.logging as dlog
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers.models.attention_flax import FlaxAttention

from tmpq_jax import quant
from tmpq_jax.quant import sites as sites_mod

dlog.set_verbosity_error()
logging.getLogger("diffusers").setLevel(logging.ERROR)

CHUNK = 8  # 30 queries: 3 full blocks and a remainder of 6
T_Q, T_K = 30, 12
CONFIGS = [(False, False), (True, False), (False, True), (True, True)]  # (memory efficient, split head dim)
PLAIN, CHUNKED = (False, False), (True, False)
BITS = [2, 4, 8, 16]
DEFAULT_CHUNK = sites_mod.QUERY_CHUNK_SIZE


def attention(cfg):
    return FlaxAttention(16, heads=2, dim_head=8, use_memory_efficient_attention=cfg[0], split_head_dim=cfg[1])


def intercept(operand_fn):
    return nn.intercept_methods(quant.make_interceptor(operand_fn))


def random_params(module, key, *inputs):
    """Params of `module` without compiling its init: shapes from eval_shape, values N(0, 0.3^2)."""
    shapes = jax.eval_shape(module.init, key, *inputs)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])


def max_diff(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


class Setup:
    """One cross-attention (T_Q queries, T_K keys), its sites per config and tables calibrated per config."""

    def __init__(self):
        keys = jax.random.split(jax.random.key(0), 4)
        self.x = jax.random.normal(keys[0], (2, T_Q, 16))
        self.ctx = jax.random.normal(keys[1], (2, T_K, 24))
        self.params = random_params(attention(PLAIN), keys[2], self.x, self.ctx)["params"]
        calib = [(jax.random.normal(k, (2, T_Q, 16)), jax.random.normal(jax.random.fold_in(k, 1), (2, T_K, 24)))
                 for k in jax.random.split(keys[3], 2)]
        self.apply = {cfg: self.make_apply(cfg) for cfg in CONFIGS}
        example = (self.x[:1], self.ctx[:1])
        self.sites = {cfg: quant.discover_sites(self.apply[cfg], self.params, example, rules=()) for cfg in CONFIGS}
        self.tables = {cfg: quant.calibrate(self.apply[cfg], self.params, self.sites[cfg], calib, BITS)
                       for cfg in (PLAIN, CHUNKED, (True, True))}
        self.qapply = {cfg: jax.jit(lambda cand, p, x, ctx, cfg=cfg: quant.quantized_apply(
            self.apply[cfg], self.sites[PLAIN], cand)(p, x, ctx)) for cfg in CONFIGS}  # compiled on first use

    @staticmethod
    def make_apply(cfg):
        model = attention(cfg)
        return lambda p, x, ctx: model.apply({"params": p}, x, ctx)

    def candidate(self, kind):
        n = len(self.sites[PLAIN])
        if kind in ("8bit", "16bit"):
            b = jnp.full((n,), int(kind[:-3]), jnp.int32)
            return b, b
        rng = np.random.default_rng(0)  # mixed low bits, probabilities included (no rules)
        return jnp.asarray(rng.choice([2, 4, 8], n), jnp.int32), jnp.asarray(rng.choice([2, 4, 8], n), jnp.int32)

    def quantized(self, cfg, tables, kind):
        sites = self.sites[PLAIN]
        cand = quant.gather_candidate(tables, sites, *self.candidate(kind))
        return self.qapply[cfg](cand, quant.quantize_params(self.params, sites, cand), self.x, self.ctx)


@pytest.fixture(scope="module")
def chunk():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sites_mod, "QUERY_CHUNK_SIZE", CHUNK)
        yield CHUNK


@pytest.fixture(scope="module")
def setup(chunk):
    return Setup()


def test_same_sites_and_macs(setup):
    plain = setup.sites[PLAIN]
    matmuls = {s.path: s.macs for s in plain.sites if s.kind == "matmul"}
    assert matmuls == {"/qk": 2 * T_Q * T_K * 8, "/av": 2 * T_Q * T_K * 8}, matmuls  # heads x Tq x Tk x dim_head
    for cfg in CONFIGS:
        assert setup.sites[cfg] == plain, cfg


def test_calibration_tables_equal(setup):
    ref = jax.tree.leaves(setup.tables[PLAIN])
    for cfg, tables in setup.tables.items():
        for a, b in zip(jax.tree.leaves(tables), ref):
            np.testing.assert_array_equal(a, b, err_msg=str(cfg))


@pytest.mark.parametrize("kind", ["8bit", "mixed"])
def test_quantized_outputs_agree(setup, kind):
    ref = setup.quantized(PLAIN, setup.tables[PLAIN], kind)
    assert max_diff(ref, setup.apply[PLAIN](setup.params, setup.x, setup.ctx)) > 1e-3  # it does quantize
    for cfg in (CHUNKED, (True, True)):  # (False, True) runs the plain path's code
        for tables in (PLAIN, cfg):  # plain tables reused, and the config's own
            out = setup.quantized(cfg, setup.tables[tables], kind)
            assert max_diff(out, ref) < 1e-5, (cfg, tables, max_diff(out, ref))


def test_which_path_runs(setup):
    """Quantized forwards of memory-efficient modules map over query blocks; observers (calibration) do not."""
    cand = quant.gather_candidate(setup.tables[PLAIN], setup.sites[PLAIN], *setup.candidate("8bit"))

    def has_map(fn):
        return "scan" in str(jax.make_jaxpr(fn)(setup.params, setup.x, setup.ctx))

    def observed(cfg):
        def fn(p, x, ctx):
            with intercept(lambda path, role, v: v):
                return setup.apply[cfg](p, x, ctx)
        return fn

    for cfg in CONFIGS:
        assert has_map(quant.quantized_apply(setup.apply[cfg], setup.sites[PLAIN], cand)) == cfg[0], cfg
        assert not has_map(observed(cfg)), cfg


def test_unhooked_equals_hooked_identity(setup):
    for cfg in CONFIGS:
        # diffusers itself fails with both flags (it transposes 4-D split-head operands as 3-D): compare with its
        # memory-efficient path there
        ref = jax.jit(setup.apply[CHUNKED if cfg == (True, True) else cfg])(setup.params, setup.x, setup.ctx)

        @jax.jit
        def identity(p, x, ctx, cfg=cfg):  # an observer operand_fn: whole-tensor path
            with intercept(lambda path, role, v: v):
                return setup.apply[cfg](p, x, ctx)

        passthrough = setup.quantized(cfg, setup.tables[PLAIN], "16bit")  # a non-observer: query blocks
        for out in (identity(setup.params, setup.x, setup.ctx), passthrough):
            assert max_diff(out, ref) < 1e-5, (cfg, max_diff(out, ref))


@pytest.mark.parametrize("t", [24, 4])  # a multiple of the block; one block (no chunking). 30 is in `setup`
def test_self_attention_block_sizes(chunk, t):
    x = jax.random.normal(jax.random.key(3), (2, t, 16))
    params = random_params(attention(PLAIN), jax.random.key(4), x)

    def run(cfg):
        with intercept(lambda path, role, v: quant.qdq_asymmetric(v, -1.0, 1.0, jnp.int32(4))):
            return attention(cfg).apply(params, x)

    ref = jax.jit(run, static_argnums=0)(PLAIN)
    for cfg in (CHUNKED, (True, True)) if t > CHUNK else (CHUNKED,):
        assert max_diff(jax.jit(run, static_argnums=0)(cfg), ref) < 1e-5, (t, cfg)


def _max_intermediate(jaxpr) -> int:
    """Largest array (elements) made by any equation of a jaxpr, sub-jaxprs (map/scan/pjit bodies) included."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()))))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    biggest = max(biggest, _max_intermediate(inner))
    return biggest


@pytest.mark.parametrize("mem_eff,split", [(True, False), (True, True), (False, False)])
def test_chunked_jaxpr_has_no_t_by_t_intermediate(mem_eff, split, monkeypatch):
    monkeypatch.setattr(sites_mod, "QUERY_CHUNK_SIZE", DEFAULT_CHUNK)  # 1024
    t = 4096  # traced only, never run
    model = FlaxAttention(8, heads=1, dim_head=8, use_memory_efficient_attention=mem_eff, split_head_dim=split)
    x = jax.ShapeDtypeStruct((1, t, 8), jnp.float32)
    params = jax.eval_shape(FlaxAttention(8, heads=1, dim_head=8).init, jax.random.key(0), x)  # diffusers' init

    def fwd(p, x):
        with intercept(lambda path, role, v: quant.qdq_asymmetric(v, -1.0, 1.0, jnp.int32(8))):
            return model.apply(p, x)

    biggest = _max_intermediate(jax.make_jaxpr(fwd)(params, x).jaxpr)
    assert (biggest < t * t) == mem_eff, biggest
