import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from tmpq_jax import checkpoint, models, quant, sampling
from tmpq_jax.quant.calibrate import WEIGHT_CLIP_GRID, calibrate_weights
from tmpq_jax.quant.sites import kernel_key

from cost_helpers import MATMUL_SCALES, mac_ratios

ROOT = Path(__file__).resolve().parents[1]


def uniform(tiny, w, a):
    n = len(tiny.sites)
    return jnp.full((n,), w, jnp.int32), jnp.full((n,), a, jnp.int32)


# --- fake quant ---------------------------------------------------------------------------------------------------


def test_qdq_passthrough_at_16_bits_and_error_falls_with_bits():
    x = jax.random.normal(jax.random.key(0), (64, 32))
    clip = jnp.max(jnp.abs(x), axis=0)
    np.testing.assert_array_equal(quant.qdq_symmetric(x, clip, jnp.int32(16)), x)
    np.testing.assert_array_equal(quant.qdq_asymmetric(x, -1.0, 1.0, jnp.int32(16)), x)
    for fn in (lambda b: quant.qdq_symmetric(x, clip, b), lambda b: quant.qdq_asymmetric(x, x.min(), x.max(), b)):
        errs = [float(jnp.mean((fn(jnp.int32(b)) - x) ** 2)) for b in (2, 4, 6, 8, 10)]
        assert all(e1 > 2 * e2 for e1, e2 in zip(errs, errs[1:])), errs


def test_qdq_levels_and_grad():
    x = jnp.linspace(-1, 1, 1001)
    assert len(np.unique(quant.qdq_symmetric(x, 1.0, jnp.int32(3)))) == 7  # -3..3
    assert len(np.unique(quant.qdq_asymmetric(x, -1.0, 1.0, jnp.int32(3)))) <= 8
    g = jax.grad(lambda v: jnp.sum(quant.qdq_symmetric(v, 1.0, jnp.int32(4))))(x * 0.5)
    np.testing.assert_array_equal(g, jnp.ones_like(x))  # straight-through inside the clip range
    vm = jax.vmap(lambda b: quant.qdq_symmetric(x, 1.0, b))(jnp.asarray([4, 8]))
    np.testing.assert_array_equal(vm[1], quant.qdq_symmetric(x, 1.0, jnp.int32(8)))


@pytest.mark.parametrize("bad,msg", [([1, 8], r"\[1\] outside the valid range \[2, 16\]"),
                                     ([8, 17], r"\[17\] outside"), ([8.5], "integers")])
def test_bad_bits(bad, msg):
    with pytest.raises(ValueError, match=msg):
        quant.check_bits(bad)


# --- model-level ---------------------------------------------------------------------------------------------------


def test_16_bits_equals_fp(tiny):
    w, a = uniform(tiny, 16, 16)
    cand = quant.gather_candidate(tiny.tables, tiny.sites, w, a)
    qapply = quant.quantized_apply(tiny.apply, tiny.sites, cand)
    x, t = tiny.noise, jnp.full((4,), 321)
    out = qapply(quant.quantize_params(tiny.params, tiny.sites, cand), x, t, tiny.labels)
    np.testing.assert_array_equal(out, tiny.apply(tiny.params, x, t, tiny.labels))


def test_output_error_falls_as_bits_rise(any_tiny):
    x, t = any_tiny.noise, jnp.full((4,), 321)
    ref = any_tiny.apply(any_tiny.params, x, t, any_tiny.labels)
    errs = []
    for b in (2, 4, 6, 8):
        cand = quant.gather_candidate(any_tiny.tables, any_tiny.sites, *uniform(any_tiny, b, b))
        out = quant.quantized_apply(any_tiny.apply, any_tiny.sites, cand)(
            quant.quantize_params(any_tiny.params, any_tiny.sites, cand), x, t, any_tiny.labels)
        errs.append(float(jnp.mean((out - ref) ** 2)))
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 10, errs


def test_changing_one_site_changes_only_its_kernel(tiny):
    w, a = uniform(tiny, 8, 8)
    i = next(i for i, s in enumerate(tiny.sites.sites) if s.kind == "conv" and "conv1" in s.path)
    q8 = flatten_dict(quant.quantize_params(tiny.params, tiny.sites, quant.gather_candidate(tiny.tables, tiny.sites,
                                                                                            w, a)))
    q2 = flatten_dict(quant.quantize_params(tiny.params, tiny.sites, quant.gather_candidate(
        tiny.tables, tiny.sites, w.at[i].set(2), a)))
    changed = {"/".join(k) for k in q8 if not np.array_equal(q8[k], q2[k])}
    assert changed == {"/".join(kernel_key(tiny.sites.sites[i].path))}


def test_activation_bits_are_applied_per_site(tiny):
    w, a = uniform(tiny, 16, 16)
    x, t = tiny.noise, jnp.full((4,), 321)

    def out(a_bits):
        cand = quant.gather_candidate(tiny.tables, tiny.sites, w, a_bits)
        return quant.quantized_apply(tiny.apply, tiny.sites, cand)(tiny.params, x, t, tiny.labels)

    base = out(a)
    for i in (0, len(tiny.sites) // 2, len(tiny.sites) - 1):
        assert not np.array_equal(out(a.at[i].set(2)), base), tiny.sites.sites[i].path


# --- calibration --------------------------------------------------------------------------------------------------


def test_calibration_is_reproducible_and_sane(any_tiny):
    again = quant.calibrate(any_tiny.apply, any_tiny.params, any_tiny.sites, quant.trajectory_batches(any_tiny.calib_inputs, 8),
                            [16, 8, 6, 4, 2])
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(any_tiny.tables)):
        np.testing.assert_array_equal(a, b)
    rows = np.asarray(any_tiny.tables.table_bits).tolist()
    assert rows == [2, 4, 6, 8, 16]
    lo, hi = any_tiny.tables.a_range[..., 0], any_tiny.tables.a_range[..., 1]
    assert bool(jnp.all(lo <= hi))
    # fewer bits -> tighter (or equal) MSE-optimal clipping; the 16-bit (pass-through) row keeps abs-max
    for path, w_clip in any_tiny.tables.w_clip.items():
        kernel = flatten_dict(any_tiny.params)[kernel_key(path)]
        absmax = np.abs(np.asarray(kernel)).reshape(-1, kernel.shape[-1]).max(0)
        assert bool(jnp.all(w_clip[0] <= w_clip[3] + 1e-7)), path
        np.testing.assert_allclose(w_clip[4], absmax, rtol=1e-6)


def test_mse_weight_clip_beats_abs_max_on_trained_kernels():
    """On the trained mnist-small kernels at 5 bits, each channel's clip is the MSE optimum of the clip grid, and every
    kernel quantizes with less error than abs-max clipping (measured: 0.76 to 0.95 of it, 0.880 over all kernels)."""
    spec = models.get_spec("mnist-small")
    m = models.build_model(spec)
    params = checkpoint.load_params(ROOT / "checkpoints" / "mnist-small" / "ema_params.msgpack", spec)
    sites = quant.discover_sites(lambda p, *a: m.apply({"params": p}, *a), models.param_shapes(spec),
                                 models.example_inputs(spec), rules=())
    clips = calibrate_weights(params, sites, [5])
    flat = flatten_dict(params)
    total, total_absmax = 0.0, 0.0
    for s in sites.weight_sites:
        w = np.asarray(flat[kernel_key(s.path)], np.float32)
        w = w.reshape(-1, w.shape[-1])
        absmax = np.abs(w).max(0)

        def err(clip):  # per output channel
            return np.sum((np.asarray(quant.qdq_symmetric(jnp.asarray(w), jnp.asarray(clip), jnp.int32(5))) - w) ** 2,
                          axis=0, dtype=np.float64)

        grid = np.stack([err(g * absmax) for g in WEIGHT_CLIP_GRID])  # (G, C); row 0 is abs-max
        chosen = err(np.asarray(clips[s.path][0]))
        assert np.all(chosen <= grid.min(0) * (1 + 1e-5)), s.path  # measured: within 2.1e-6 of the grid's minimum
        assert chosen.sum() < 0.96 * grid[0].sum(), (s.path, chosen.sum() / grid[0].sum())  # worst measured 0.949
        total, total_absmax = total + chosen.sum(), total_absmax + grid[0].sum()
    assert total / total_absmax == pytest.approx(0.880, abs=0.01)


_OPERANDS = {}  # model name -> {"path|role": every value of the operand on the calibration batches}


def calibration_operands(tiny):
    """Every value each site operand takes on the calibration batches (every call of a site), flattened."""
    if tiny.spec.name not in _OPERANDS:
        @jax.jit
        def operands(*inputs):
            found = {}

            def record(path, role, x):
                found.setdefault(f"{path}|{role}", []).append(x.reshape(-1))
                return x

            with nn.intercept_methods(quant.make_interceptor(record)):
                tiny.apply(tiny.params, *inputs)
            return {k: jnp.concatenate(v) for k, v in found.items()}

        batches = [jax.device_get(operands(*b)) for b in quant.trajectory_batches(tiny.calib_inputs, 8)]
        _OPERANDS[tiny.spec.name] = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return _OPERANDS[tiny.spec.name]


def activation_ranges(tiny):
    """(operand, its calibration values, its calibrated (B, 2) ranges) for the 'a' operand of every site and the
    'w' operand (k, v) of every attention matmul."""
    values = calibration_operands(tiny)
    for i, s in enumerate(tiny.sites.sites):
        for role, table in (("a", tiny.tables.a_range), ("w", tiny.tables.w_range)):
            if role == "a" or not s.has_weights:
                yield f"{s.path}|{role}", values[f"{s.path}|{role}"], np.asarray(table[i, 0])  # one group


def qdq_mse(x, lo, hi, bits) -> float:
    return float(np.mean((np.asarray(quant.qdq_asymmetric(jnp.asarray(x), lo, hi, jnp.int32(bits))) - x) ** 2))


# Least fraction of an operand's calibration values inside its calibrated range, per bit-width; worst operand
# measured on mnist-tiny / the UNet2DModel port: 0.554 / 0.563 at 2 bits, 0.665 / 0.711 at 4, 0.775 / 0.805 at 6,
# 0.876 / 0.903 at 8. More than half keeps the median inside. The least covered operands at 8 bits are SiLU outputs:
# many values share its floor (-0.278), and the range leaves them out by at most 5% of it
COVERAGE = {2: 0.5, 4: 0.6, 6: 0.7, 8: 0.8}


def test_calibrated_ranges_bracket_their_data(any_tiny):
    """Each operand's range lies within the values it was calibrated on and holds most of them; the 16-bit row is
    their min and max over all batches."""
    bits = np.asarray(any_tiny.tables.table_bits).tolist()
    assert bits == [2, 4, 6, 8, 16]
    for name, x, ranges in activation_ranges(any_tiny):
        mn, mx = float(x.min()), float(x.max())
        np.testing.assert_allclose(ranges[-1], [mn, mx], rtol=1e-5, atol=1e-7, err_msg=name)
        slack = 1e-5 * (mx - mn)  # the calibration's forward is another compiled program: last-bit differences
        for b, (lo, hi) in zip(bits[:-1], ranges[:-1]):
            lo, hi = min(lo, 0.0), max(hi, 0.0)  # the range QDQ uses always holds 0
            assert min(mn, 0.0) - slack <= lo and hi <= max(mx, 0.0) + slack, (name, b, (lo, hi), (mn, mx))
            inside = float(np.mean((x >= lo) & (x <= hi)))
            assert inside >= COVERAGE[b], (name, b, inside)


# median over operands of MSE(calibrated range) / MSE(min..max) on the calibration values; measured on mnist-tiny /
# the UNet2DModel port: 0.307 / 0.409 at 2 bits, 0.498 / 0.683 at 4
MEDIAN_MSE_RATIO = {2: 0.5, 4: 0.8}


def test_calibrated_ranges_beat_min_max_at_low_bits(any_tiny):
    """At 2 and 4 bits the MSE-searched range quantizes every operand's calibration values with no more error than
    the plain min..max range (measured worst: 0.74 of it at 2 bits, 1.0 at 4), and typically with far less."""
    bits = np.asarray(any_tiny.tables.table_bits).tolist()
    for b, limit in MEDIAN_MSE_RATIO.items():
        ratios = []
        for name, x, ranges in activation_ranges(any_tiny):
            plain = qdq_mse(x, x.min(), x.max(), b)
            chosen = qdq_mse(x, *ranges[bits.index(b)], b)
            assert chosen <= plain * (1 + 1e-3) + 1e-12, (name, b, chosen, plain)
            if plain > 0:  # 0: a constant operand (softmax over a single key)
                ratios.append(chosen / plain)
        assert np.median(ratios) < limit, (b, np.median(ratios))


@pytest.mark.xfail(strict=True, reason="known: the range search scores the grid on a 2048-value sample per batch, "
                   "which misses the tails, so at 8 bits it clips values it never saw (29 of 110 mnist-tiny operands "
                   "quantize their calibration values worse than min..max, up to 3.2x; 20x on the UNet2DModel port)")
def test_calibrated_ranges_no_worse_than_min_max_at_8_bits(tiny):
    bits = np.asarray(tiny.tables.table_bits).tolist()
    worse = [name for name, x, ranges in activation_ranges(tiny)
             if qdq_mse(x, *ranges[bits.index(8)], 8) > qdq_mse(x, x.min(), x.max(), 8) * (1 + 1e-3) + 1e-12]
    assert not worse, f"{len(worse)} operands, e.g. {worse[:3]}"


def test_tables_save_load_and_mismatch(tmp_path, tiny):
    path = tmp_path / "tables.msgpack"
    quant.save_tables(path, tiny.tables, tiny.sites)
    back = quant.load_tables(path, tiny.sites, [8, 6])
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tiny.tables)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(checkpoint.CheckpointError, match=r"lack bit-widths \[3\]"):
        quant.load_tables(path, tiny.sites, [8, 3])
    other = quant.SiteTable(tiny.sites.sites[:-1])
    with pytest.raises(checkpoint.CheckpointError, match="other sites"):
        quant.load_tables(path, other)


def test_candidate_bit_errors(tiny):
    n = len(tiny.sites)
    with pytest.raises(ValueError, match=f"length {n}"):
        quant.check_candidate_bits(tiny.sites, tiny.tables, [8] * (n - 1), [8] * n)
    with pytest.raises(ValueError, match=r"\[5\] that the tables were not calibrated"):
        quant.check_candidate_bits(tiny.sites, tiny.tables, [5] * n, [8] * n)
    with pytest.raises(ValueError, match=r"\[20\] outside"):
        quant.check_candidate_bits(tiny.sites, tiny.tables, [8] * n, [20] * n)
    with pytest.raises(KeyError, match="unknown site names.*unet/nope"):
        tiny.sites.vector_from_map({"unet/nope": 8}, "w_bits", default=8)


def _weight_site(tiny, k=1):
    """Index and path of the k-th site with a kernel (k=1: not conv_in, so an earlier site exists)."""
    i = [i for i, s in enumerate(tiny.sites.sites) if s.has_weights][k]
    return i, tiny.sites.sites[i].path


def test_uncalibrated_bits_raise_at_public_entry_points(tiny):
    n = len(tiny.sites)
    i, path = _weight_site(tiny)
    w, a = uniform(tiny, 8, 8)
    with pytest.raises(ValueError, match=rf"w_bits uses bit-widths \[5\] that the tables were not calibrated for, "
                                         rf"at 1 of {n} sites \(first: '{path}'\); calibrated: \[2, 4, 6, 8, 16\]"):
        quant.gather_candidate(tiny.tables, tiny.sites, w.at[i].set(5), a)
    with pytest.raises(ValueError, match=rf"a_bits uses bit-widths \[3, 7\].*at 2 of {n} sites"):
        quant.gather_candidate(tiny.tables, tiny.sites, w, a.at[0].set(3).at[i].set(7))
    with pytest.raises(ValueError, match=r"w_bits uses bit-widths \[5\]"):
        sampling.sample_candidate(tiny.apply, tiny.sites, tiny.abar, tiny.params, tiny.tables, w.at[i].set(5), a,
                               POP_TIMESTEPS[0], tiny.noise, tiny.labels)
    # a concrete population (P, L) is checked before anything is compiled or run
    pw, pa = jnp.stack([w, w.at[i].set(5)]), jnp.stack([a, a])
    sampler = sampling.make_population_sampler(tiny.apply, tiny.sites, "loop")
    shared = (tiny.abar, tiny.params, tiny.tables, tiny.noise, tiny.labels)
    with pytest.raises(ValueError, match=rf"\[5\].*at 1 of {n} sites.*in 1 of 2 candidates \(first: #1\); "
                                         r"calibrated: \[2, 4, 6, 8, 16\]"):
        sampler((pw, pa, POP_TIMESTEPS[:2]), shared)
    with pytest.raises(ValueError, match=rf"population of shape \(P, {n}\)"):
        sampler((pw[:, :-1], pa[:, :-1], POP_TIMESTEPS[:2]), shared)


def test_bit_row_flags_uncalibrated_bits_when_traced(tiny):
    bits = jnp.asarray([[2, 4, 5, 8], [16, 3, 17, 6]])
    rows = jax.jit(jax.vmap(tiny.tables.bit_row))(bits)
    np.testing.assert_array_equal(rows, [[0, 1, 5, 3], [4, 5, 0, 2]])  # 5: one past the 5 rows; 17 passes through


def test_traced_uncalibrated_bits_give_nan_not_row_0(tiny):
    i, path = _weight_site(tiny)
    w, a = uniform(tiny, 8, 8)
    x, t = tiny.noise, jnp.full((4,), 321)

    def gather(w_bits, a_bits):
        return quant.gather_candidate(tiny.tables, tiny.sites, w_bits, a_bits)

    @jax.jit
    def forward(w_bits, a_bits):  # bits traced: no concrete check can run
        cand = gather(w_bits, a_bits)
        return quant.quantized_apply(tiny.apply, tiny.sites, cand)(
            quant.quantize_params(tiny.params, tiny.sites, cand), x, t, tiny.labels)

    assert np.isfinite(forward(w, a)).all()
    assert np.isnan(forward(w.at[i].set(5), a)).all()  # the old argmax gathered the 2-bit row: finite output
    assert np.isnan(forward(w, a.at[i].set(3))).all()
    # batched (vmap) over a population: only the uncalibrated site's parameters are NaN
    cands = jax.jit(jax.vmap(gather))(jnp.stack([w, w.at[i].set(5), w]), jnp.stack([a, a, a.at[i].set(3)]))
    assert np.isnan(cands.w_clip[path][1]).all() and np.isfinite(cands.w_clip[path][jnp.asarray([0, 2])]).all()
    assert np.isnan(cands.w_range[1, i]).all() and np.isnan(cands.a_range[2, i]).all()
    others = np.delete(np.arange(len(tiny.sites)), i)
    assert np.isfinite(cands.a_range[:, others]).all() and np.isfinite(cands.w_range[:, others]).all()
    assert all(np.isfinite(v).all() for k, v in cands.w_clip.items() if k != path)


def test_16_bits_pass_through_without_a_16_row(tiny):
    tb = tiny.tables
    no16 = tb.replace(table_bits=tb.table_bits[:4], w_clip={k: v[:4] for k, v in tb.w_clip.items()},
                      a_range=tb.a_range[:, :, :4], w_range=tb.w_range[:, :, :4], skip_range=tb.skip_range[:, :, :4])
    w, a = uniform(tiny, 16, 16)
    quant.check_candidate_bits(tiny.sites, no16, w, a)
    # concrete: the model output is exactly full precision
    x, t = tiny.noise, jnp.full((4,), 321)
    cand = quant.gather_candidate(no16, tiny.sites, w, a)
    out = quant.quantized_apply(tiny.apply, tiny.sites, cand)(quant.quantize_params(tiny.params, tiny.sites, cand),
                                                              x, t, tiny.labels)
    np.testing.assert_array_equal(out, tiny.apply(tiny.params, x, t, tiny.labels))

    # traced: every kernel and every site operand passes through exactly
    @jax.jit
    def traced(w_bits, a_bits, tables):
        cand = quant.gather_candidate(tables, tiny.sites, w_bits, a_bits)
        ops = jax.vmap(lambda r, b: quant.qdq_asymmetric(x, r[0], r[1], b))
        return (quant.quantize_params(tiny.params, tiny.sites, cand), ops(cand.a_range[:, 0], cand.a_bits),
                ops(cand.w_range[:, 0], cand.w_bits))

    qparams, a_ops, w_ops = traced(w, a, no16)
    for p, q in zip(jax.tree.leaves(tiny.params), jax.tree.leaves(qparams)):
        np.testing.assert_array_equal(q, p)
    for ops in (a_ops, w_ops):
        np.testing.assert_array_equal(ops, jnp.broadcast_to(x, ops.shape))
    # their gathered parameters are finite (not the NaN of an uncalibrated bit-width): gradients stay clean
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(cand))
    grads = jax.jit(jax.grad(lambda prm: sum(jnp.sum(leaf) for leaf in jax.tree.leaves(quant.quantize_params(
        prm, tiny.sites, quant.gather_candidate(no16, tiny.sites, w, a))))))(tiny.params)
    for g in jax.tree.leaves(grads):
        np.testing.assert_array_equal(g, jnp.ones_like(g))


def test_load_tables_rejects_non_finite(tmp_path, tiny):
    i, path = _weight_site(tiny)
    tb = tiny.tables
    bad = tb.replace(w_clip={**tb.w_clip, path: tb.w_clip[path].at[1, 0].set(jnp.nan)})
    quant.save_tables(tmp_path / "w.msgpack", bad, tiny.sites)
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf"non-finite value: w_clip of site '{path}' \({i + 1} of {len(tiny.sites)}\) at 4 bits "
                             r"holds nan.*recalibrate"):
        quant.load_tables(tmp_path / "w.msgpack", tiny.sites)
    j = len(tiny.sites) - 1
    bad = tb.replace(a_range=tb.a_range.at[j, 0, 2, 1].set(jnp.inf))
    quant.save_tables(tmp_path / "a.msgpack", bad, tiny.sites)
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf"a_range of site '{tiny.sites.sites[j].path}' .* at 6 bits holds inf"):
        quant.load_tables(tmp_path / "a.msgpack", tiny.sites)


def test_calibrate_rejects_nan_params(tiny):
    i, path = _weight_site(tiny)
    flat = flatten_dict(tiny.params)
    key = kernel_key(path)
    batch = [next(quant.trajectory_batches(tiny.calib_inputs, 8))]
    nan_kernel = unflatten_dict({**flat, key: flat[key].at[..., 0].set(jnp.nan)})
    with pytest.raises(ValueError, match=rf"w_clip of site '{path}' \({i + 1} of .* at 2 bits holds nan.*"
                                         r"model's outputs for NaN, then recalibrate"):
        quant.calibrate(tiny.apply, nan_kernel, tiny.sites, batch, [16, 8, 6, 4, 2])
    # NaN outside any kernel (a bias) poisons the activations after it: caught at the end of calibration
    # (on a two-layer model, which compiles in a blink)
    m = TwoLayer()
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
    params = m.init(jax.random.key(1), x)["params"]
    apply = lambda p, x: m.apply({"params": p}, x)  # noqa: E731
    sites = quant.discover_sites(apply, params, (x,), rules=())
    quant.calibrate(apply, params, sites, [(x,)], [8, 4])  # finite params: fine
    params["conv"]["bias"] = params["conv"]["bias"].at[0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"non-finite quantizer parameter: a_range of site 'fc' \(2 of 2\), "
                                         r"timestep group 0, at 4 bits holds nan"):
        quant.calibrate(apply, params, sites, [(x,)], [8, 4])


def test_rules_pin_bits_and_reject_unmatched_patterns(tiny):
    pinned = quant.sites.apply_rules(list(tiny.sites.sites), [quant.QuantRule(r"conv_in$", w_bits=8, a_bits=8)])
    hit = [s for s in pinned if s.fixed_w_bits]
    assert [s.path for s in hit] == ["unet/conv_in"]
    with pytest.raises(ValueError, match="matches no site"):
        quant.sites.apply_rules(list(tiny.sites.sites), [quant.QuantRule("no_such_layer", a_bits=8)])


def _site(path, **kw):
    return quant.Site(path, "conv", 100, 4, kernel_shape=(3, 3, 2, 4), **kw)


def _pin_first_last(sites, bits, user_rules=()):
    """The rules as build_problem orders them: first and last layer first, a user's rules after (theirs win)."""
    return quant.SiteTable(tuple(quant.sites.apply_rules(list(sites.sites),
                                                         [*quant.first_last_rules(bits), *user_rules])))


@pytest.mark.parametrize("paths,error", [
    (["unet/conv_in", "unet/mid/conv1", "unet/conv_out"], None),
    (["conv_in", "block/conv", "conv_out"], None),  # a top-level model
    (["unet/mid/conv1", "unet/conv_out"], r"'\(\^\|/\)conv_in\$' matches no site.*first_last_bits.*set it to 0"),
    (["unet/conv_in", "vae/conv_in", "unet/conv_out"],
     r"must match one site, but matches 2 \(\['unet/conv_in', 'vae/conv_in'\]\).*first_last_bits"),
    (["unet/conv_in", "unet/conv_out_proj"], r"'\(\^\|/\)conv_out\$' matches no site"),
])
def test_first_last_rules_pin_exactly_conv_in_and_conv_out(paths, error):
    sites = quant.SiteTable(tuple(_site(p) for p in paths))
    if error:
        with pytest.raises(ValueError, match=error):
            _pin_first_last(sites, 8)
        return
    pinned = _pin_first_last(sites, 8)
    assert [(s.fixed_w_bits, s.fixed_a_bits) for s in pinned.sites] == [(8, 8), (0, 0), (8, 8)]


def test_first_last_rules_yield_to_a_users_rule_and_reject_bad_bits():
    sites = quant.SiteTable((_site("unet/conv_in"), _site("unet/conv_out")))
    pinned = _pin_first_last(sites, 7, [quant.QuantRule(r"conv_in$", a_bits=16)])
    assert [(s.fixed_w_bits, s.fixed_a_bits) for s in pinned.sites] == [(7, 16), (7, 7)]
    assert quant.first_last_rules(0) == ()
    with pytest.raises(ValueError, match="first_last_bits"):
        quant.first_last_rules(1)


@pytest.mark.parametrize("name", sorted(models.MODEL_SPECS))
def test_every_built_in_model_has_one_first_and_one_last_layer(name):
    spec = models.get_spec(name)
    model = models.build_model(spec)
    sites = quant.discover_sites(lambda p, *a: model.apply({"params": p}, *a), models.param_shapes(spec),
                                 models.example_inputs(spec), rules=quant.first_last_rules(8))
    hit = [s.path for s in sites.sites if s.fixed_w_bits == 8]
    assert [p.split("/")[-1] for p in hit] == ["conv_in", "conv_out"]
    assert sites.paths.index(hit[1]) == len(sites) - 1  # the last site is the last layer


# --- BitOPs -------------------------------------------------------------------------------------------------------


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), padding="SAME", name="conv")(x)  # 6*6 * 8 * 3*3*3 = 7776 MACs per image
        return nn.Dense(5, name="fc")(x.reshape(x.shape[0], -1))  # 288 * 5 = 1440 MACs


def test_bitops_of_two_layer_model_equals_hand_count():
    m = TwoLayer()
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 6, 6, 3)))["params"]
    sites = quant.discover_sites(lambda p, x: m.apply({"params": p}, x), shapes, (jnp.zeros((1, 6, 6, 3)),),
                                 rules=())
    assert sites.paths == ("conv", "fc")
    np.testing.assert_array_equal(sites.macs, [7776, 1440])
    hand = (7776 * 4 * 6 + 1440 * 8 * 5) * 10
    assert quant.bitops(sites, [4, 8], [6, 5], 10) == hand
    np.testing.assert_array_equal(quant.bitops(sites, [[4, 8], [8, 8]], [[6, 5], [8, 8]], 10),
                                  [hand, (7776 + 1440) * 64 * 10])
    assert quant.fp_bitops(sites, 100) == (7776 + 1440) * 32 * 32 * 100


def test_bitops_are_exact_integers_where_float32_rounds():
    """MACs of 2^24 + 1 are not a float32: an int64 count keeps every BitOP (the exact Budget compares with it)."""
    sites = quant.SiteTable((quant.Site("big", "dense", 2**24 + 1, 1), quant.Site("small", "dense", 3, 1)))
    got = quant.bitops(sites, [1, 1], [1, 1], 1)
    assert isinstance(got, int) and got == 2**24 + 4
    assert quant.bitops(sites, [8, 8], [8, 8], 1000) == (2**24 + 4) * 64 * 1000


MAC_RATIO_MNIST_SMALL = 1.028  # 2 x our MACs / XLA flops of the mnist-small forward, measured 1.0276 (jax 0.9.2 CPU)


def test_macs_match_xla_cost_analysis():
    """2 x our MACs vs XLA's flop count of the whole forward: within 0.02 of the measured 1.028.

    Two known differences pull in opposite directions: we count every kernel tap of a SAME-padded conv
    (H_out*W_out*C_out*C_in*kh*kw, the standard count), XLA skips taps in the padding (~5% of a 3x3 conv at 28x28,
    ~18% at 7x7); XLA adds elementwise work (GroupNorm, SiLU, softmax, biases, residuals), a few percent. The
    attention matmuls are 6.0% of mnist-small's MACs: dropping them (0.966), doubling them (1.089) or losing or
    repeating one of qk/av (0.997, 1.058) puts the ratio outside the bound, and so would a missing layer class."""
    spec = models.get_spec("mnist-small")
    m = models.build_model(spec)
    apply = lambda p, *a: m.apply({"params": p}, *a)  # noqa: E731
    shapes = models.param_shapes(spec)
    sites = quant.discover_sites(apply, shapes, models.example_inputs(spec))
    ratios = mac_ratios(apply, shapes, models.example_inputs(spec), sites)
    print("MAC ratio by matmul scale", ratios)
    assert abs(ratios[1.0] - MAC_RATIO_MNIST_SMALL) < 0.02, ratios
    for scale in MATMUL_SCALES:  # the bound detects a miscount of the attention matmuls
        assert abs(ratios[scale] - MAC_RATIO_MNIST_SMALL) > 0.02, (scale, ratios)


# --- population strategies ----------------------------------------------------------------------------------------


POP_TIMESTEPS = jnp.asarray([[500, 100], [400, 20], [300, 5], [450, 50]])


def _population(tiny):
    """Two candidates at 16 bits and two at random low bits (2-8); every strategy must give the loop's images."""
    n = len(tiny.sites)
    rng = np.random.default_rng(0)
    w = jnp.asarray(np.concatenate([np.full((2, n), 16), rng.choice([2, 4, 6, 8], (2, n))]), jnp.int32)
    a = jnp.asarray(np.concatenate([np.full((2, n), 16), rng.choice([2, 4, 6, 8], (2, n))]), jnp.int32)
    return w, a, POP_TIMESTEPS


def _quantized_weights(tiny, strategy):
    w, a, _ = _population(tiny)
    qfn = lambda w, a, tables, params: quant.quantize_params(  # noqa: E731
        params, tiny.sites, quant.gather_candidate(tables, tiny.sites, w, a))
    return quant.population_fn(qfn, strategy, chunk_size=2)((w, a), (tiny.tables, tiny.params))


def _samples(tiny, strategy):
    shared = (tiny.abar, tiny.params, tiny.tables, tiny.noise, tiny.labels)
    return np.asarray(sampling.make_population_sampler(tiny.apply, tiny.sites, strategy, chunk_size=2)(
        _population(tiny), shared))


_LOOP_REFERENCE = {}  # model name -> (quantized weights, samples) of the loop strategy


def loop_reference(tiny):
    if tiny.spec.name not in _LOOP_REFERENCE:
        _LOOP_REFERENCE[tiny.spec.name] = _quantized_weights(tiny, "loop"), _samples(tiny, "loop")
    return _LOOP_REFERENCE[tiny.spec.name]


# Strategies are model-agnostic: map on the conditional UNet, vmap on the UNet2DModel port (cheaper there); sharded
# over several devices: test_sharded_over_four_cpu_devices.
@pytest.mark.parametrize("model, strategy", [("tiny", "map"), ("tiny_unet2d", "vmap")])
def test_strategies_match_loop(request, model, strategy):
    tiny = request.getfixturevalue(model)
    loop_q, loop = loop_reference(tiny)
    # identical quantized weights
    for x, y in zip(jax.tree.leaves(loop_q), jax.tree.leaves(_quantized_weights(tiny, strategy))):
        np.testing.assert_array_equal(x, y)
    other = _samples(tiny, strategy)
    # the same images, pixel by pixel. Measured max |difference| (images of std ~0.9): at 16 bits 3.7e-6 (map) and
    # 2.1e-6 (vmap). At low bits (2-8) under XLA's -O3: 0 (map) and 6.0e-7 (vmap); under the CPU default -O1
    # (tmpq_jax/cpu_flags.py) the map program rounds 3 of 6272 pixels differently, by at most 1.4e-3: rounding flips
    # of single activations, where two different candidates differ by ~1 nearly everywhere
    np.testing.assert_allclose(other[:2], loop[:2], rtol=0, atol=1e-5)
    diff = np.abs(other[2:] - loop[2:])
    assert np.mean(diff > 1.5e-6) <= 1e-3, f"{np.mean(diff > 1.5e-6):.2%} of low-bit pixels differ"
    assert diff.max() <= 3e-3, f"low-bit pixels differ by up to {diff.max():.3g}"


def test_sharded_over_four_cpu_devices():
    code = ("import jax, jax.numpy as jnp, numpy as np\n"
            "from tmpq_jax import quant\n"
            "assert jax.device_count() == 4, jax.devices()\n"
            "f = lambda w, a, s: (w * a).sum() * s\n"
            "pop = (jnp.arange(10 * 3).reshape(10, 3), jnp.ones((10, 3), jnp.int32))\n"
            "out = quant.population_fn(f, 'sharded')(pop, (jnp.int32(2),))\n"
            "assert quant.auto_strategy() == 'sharded'\n"
            "np.testing.assert_array_equal(out, quant.population_fn(f, 'loop')(pop, (jnp.int32(2),)))\n"
            "print('ok', out.shape)\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0 and "ok (10,)" in out.stdout, out.stderr[-2000:]


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown population strategy 'gpu'.*loop"):
        quant.population_fn(lambda x: x, "gpu")
