"""`experiments/search.py` end to end on the tiny config, and the committed checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax import checkpoint, data, diffusion, metrics, models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tiny_search):
    return tiny_search


def test_search_writes_results_with_all_fields(tiny_run):
    work, r, _ = tiny_run
    for key in ("config", "model", "reference", "budget_bitops", "best", "baselines", "history", "timing",
                "metric_name", "noise", "references"):
        assert key in r, key
    m = r["model"]
    assert m["name"] == "mnist-small" and m["sample_shape"] == [28, 28, 1] and 1e6 < m["params"] < 2e6
    assert m["unet_config"]["block_out_channels"] == [32, 64, 64]
    assert sum(m["sites"].values()) == m["macs_per_step"]
    assert set(r["reference"]) >= {"steps", "timesteps", "bitops", "report"}
    fields = {"timesteps", "w_bits", "a_bits", "bitops", "bitops_reduction", "search", "report"}
    assert set(r["baselines"]) == {"uniform_w8a8", "uniform_w6a6", "timestep_only", "precision_only", "greedy_bits",
                                   "knapsack"}
    for entry in [r["best"], *r["baselines"].values()]:
        assert set(entry) >= fields
        assert set(entry["w_bits"]) == set(m["sites"]) and set(entry["a_bits"]) == set(m["sites"])
        assert len(entry["timesteps"]) == r["config"]["num_steps"]
        assert entry["bitops_reduction"] == pytest.approx(r["reference"]["bitops"] / entry["bitops"])
    # exact integer budgets, no tolerance
    assert isinstance(r["budget_bitops"], int) and r["best"]["bitops"] <= r["budget_bitops"]
    assert r["baselines"]["uniform_w6a6"]["bitops"] == r["budget_bitops"]
    assert r["baselines"]["uniform_w8a8"]["bitops"] > r["budget_bitops"]
    assert r["baselines"]["greedy_bits"]["bitops"] <= r["budget_bitops"]
    # single-axis searches stay in their spaces
    searched = {p: b for p, b in r["baselines"]["timestep_only"]["w_bits"].items()
                if p not in ("unet/conv_in", "unet/conv_out")}  # pinned at 8 (first_last_bits)
    assert set(searched.values()) == {6}
    assert r["baselines"]["timestep_only"]["w_bits"]["unet/conv_in"] == 8
    assert r["baselines"]["precision_only"]["timesteps"] == r["baselines"]["uniform_w6a6"]["timesteps"]
    # the default search (algorithm 'local'): its knapsack start alone is a baseline, at DDIM-quad, chosen among the
    # optima on the select noise by the select metric; its probes count in the run's sampler runs
    assert r["config"]["algorithm"] == "local" and r["config"]["select_metric"] == "teacher_inception"
    knap = r["baselines"]["knapsack"]
    assert knap["timesteps"] == r["baselines"]["uniform_w6a6"]["timesteps"] and knap["within_budget"]
    assert "knapsack optimum" in knap["search"]["note"] and "teacher_inception" in knap["search"]["note"]
    assert knap["search"]["selection"] is not None and knap["search"]["select_metric"] == "teacher_inception"
    assert r["best"]["search"]["select_metric"] == "teacher_inception"
    assert r["timing"]["sampling_runs"] > r["timing"]["sensitivity_runs"] == 9  # all-top + 8 probes (mac share 0.3)
    # scored by deviation from the all-top images (the default): >= 0, 0 at the top, and some probe moved the images
    z = np.load(work / "sensitivities.npz")
    assert r["config"]["sensitivity_metric"] == "deviation" and '"metric": "deviation"' in str(z["key"])
    assert (z["w_damage"] >= 0).all() and (z["a_damage"] >= 0).all() and z["w_damage"][:, 1:].max() > 0
    assert (z["w_damage"][:, 0] == 0).all() and (z["a_damage"][:, 0] == 0).all()
    assert len(r["history"]) == r["config"]["generations"]
    assert set(r["history"][0]) >= {"generation", "best", "median", "feasible_fraction", "new"}
    assert r["timing"]["candidates_per_second"] > 0
    assert r["metric_name"] == "teacher_mse" and r["noise"]["fitness"]["n"] == 8


def test_search_reports_one_front_for_every_budget(tiny_run):
    """config.budgets (0.75, 1.0, 1.4 of the W6A6 budget): one entry per budget, each within it, the default
    budget's is `best`, the best fitness never rises with the budget, and the marked front is non-dominated."""
    work, r, _ = tiny_run
    front = r["pareto"]
    limits = [e["budget"] for e in front]
    assert limits == sorted(limits) and len(limits) == 3
    assert [e["budget_fraction"] for e in front] == pytest.approx([0.75, 1.0, 1.4], abs=1e-9)
    assert limits[1] == r["budget_bitops"]
    for e in front:
        assert not e.get("infeasible") and e["bitops"] <= e["budget"]
        assert set(e["report"]) >= set(r["report_metric_names"])
    assert front[1]["w_bits"] == r["best"]["w_bits"] and front[1]["timesteps"] == r["best"]["timesteps"]
    # the pool is shared: the largest budget's pick is among the rescore_top_k best fitnesses of all candidates
    fits = sorted(h["best"] for h in r["history"] + r["baseline_history"] if h["best"] is not None)
    assert front[2]["search"]["fitness"] <= max(fits[: r["config"]["rescore_top_k"]]) + 1e-12
    on = [e for e in front if e["on_front"]]
    assert on
    for a in on:
        sa = a["search"]["selection"]
        assert not any(b["bitops"] <= a["bitops"] and b["search"]["selection"] <= sa and
                       (b["bitops"] < a["bitops"] or b["search"]["selection"] < sa) for b in front)
    assert (work / "pareto.png").stat().st_size > 10_000
    assert (work / f"search_budget_{limits[0]}.json").is_file()


def test_every_reported_bitops_is_recomputed_from_its_bits_and_macs(tiny_run):
    """BitOPs = sum over sites of MACs x w_bits x a_bits, times the steps (TMPQ-DM eq. 6), from the JSON alone."""
    _, r, _ = tiny_run
    macs, steps = r["model"]["sites"], r["config"]["num_steps"]
    for name, entry in {"best": r["best"], **r["baselines"],
                        **{f"pareto_{i}": e for i, e in enumerate(r["pareto"])}}.items():
        cost = sum(m * entry["w_bits"][p] * entry["a_bits"][p] for p, m in macs.items()) * steps
        assert entry["bitops"] == cost, name
        assert entry["within_budget"] == (cost <= r["budget_bitops"])
    assert r["reference"]["bitops"] == sum(macs.values()) * 32 * 32 * r["config"]["reference_steps"]
    # the budget: uniform W6A6, with the attention probabilities (probs_8bit) and the first and last layer
    # (first_last_bits, weights and activations) pinned at 8 bits
    first_last = ("unet/conv_in", "unet/conv_out")
    w6 = sum(m * (8 if p in first_last else 6) * (8 if p.endswith("/av") or p in first_last else 6)
             for p, m in macs.items()) * steps
    assert r["budget_bitops"] == w6 == r["baselines"]["uniform_w6a6"]["bitops"]


def test_the_search_never_ends_worse_than_its_seed_by_its_own_fitness(tiny_run):
    """The DDIM-quad W6A6 seed is in the joint search's first population, so the search's best fitness is at most
    the seed's (same fitness noise, same cache); the reported best is one of the top-k by that fitness."""
    _, r, _ = tiny_run
    seed = r["baselines"]["uniform_w6a6"]["search"]["fitness"]
    assert [h["best"] for h in r["history"]] == sorted((h["best"] for h in r["history"]), reverse=True)
    assert r["history"][-1]["best"] <= seed
    assert r["best"]["search"]["fitness"] is not None and r["best"]["search"]["selection"] is not None


def test_reported_numbers_are_on_held_out_noise_and_data(tiny_run):
    work, r, _ = tiny_run
    noise = r["noise"]
    assert noise["fitness"]["noise_purpose"] == "fitness" and noise["select"]["noise_purpose"] == "select"
    assert noise["report"]["noise_purpose"] == "report"
    assert r["references"] == {"fitness": "mnist-fitness", "report": r["config"]["report_reference"]}
    for entry in [r["reference"], r["best"], *r["baselines"].values()]:
        for metric, rep in entry["report"].items():
            assert rep["n"] == r["config"]["final_samples"] and rep["noise_purpose"] == "report"
            assert rep["noise_seed"] == r["config"]["report_noise_seed"]
            paired = f"FP teacher ({r['config']['reference_steps']} steps)"
            assert rep["reference"] == (paired if metric.startswith("teacher_") else r["config"]["report_reference"])
    assert r["best"]["search"]["selection"] is not None  # chosen on the select noise, reported on another
    # the FP reference images are the report noise's, not the fitness noise's
    ref = np.load(work / "samples_reference.npz")["images"]
    teacher = [p for p in work.glob("teacher_fitness_*.npz")]
    assert not teacher or not np.allclose(np.load(teacher[0])["images"][:8], ref[:8] * 2 - 1)


def test_search_reports_inception_fid_of_the_final_sets(tiny_run, fid_cache):
    work, r, out = tiny_run
    assert r["report_metric_names"] == ["classifier_fd", "inception_fid", "teacher_mse"]  # + the paired fitness
    entries = {"reference": r["reference"], "best": r["best"], **r["baselines"]}
    values = {k: e["report"]["inception_fid"]["value"] for k, e in entries.items()}
    assert all(v is not None and v > 0 for v in values.values()), values
    assert "inception_fid" in out.stdout.split("held-out report")[1]
    # the reported number is the FID of the saved samples against the reference, as the CLI computes it
    cli = subprocess.run([sys.executable, str(ROOT / "experiments" / "fid.py"), "fid", str(work / "samples_best.npz"),
                          str(work.parent / "fid_reference.npz"), "--batch_size", "12", f"--cache_dir={fid_cache}",
                          "--json", str(work / "fid_best.json")], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads((work / "fid_best.json").read_text())["fid"] == pytest.approx(values["best"], rel=1e-4)


def test_search_writes_samples_plots_and_checkpoints(tiny_run):
    work, r, _ = tiny_run
    for name in ("reference", "best", "uniform_w6a6", "timestep_only", "precision_only", "greedy_bits", "knapsack"):
        images = np.load(work / f"samples_{name}.npz")["images"]
        assert images.shape == (r["config"]["final_samples"], 28, 28, 1)
        assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.1
        assert (work / f"samples_{name}.png").stat().st_size > 1000
    for png in ("search_progress.png", "bitops_vs_metric.png"):
        assert (work / png).stat().st_size > 5000
    lines = (work / "history.jsonl").read_text().splitlines()
    # two single-axis searches and the joint one, then one search at each of the 2 other budgets of the front
    assert len(lines) == 3 * r["config"]["generations"] + 2 * r["config"]["pareto_generations"]
    assert (work / "search_joint.msgpack").exists() and (work / "search_joint.json").exists()


def test_resume_under_a_changed_config_fails_before_searching(tiny_run):
    from conftest import run_tiny_search as _search

    work, r, _ = tiny_run
    out = _search(work, "--resume", "--config.search_samples=6")
    assert out.returncode != 0
    assert "settings changed (search_samples: checkpoint 8 vs now 6)" in out.stderr


@pytest.mark.slow
def test_resume_after_completion_reproduces_the_result(tiny_run):
    from conftest import run_tiny_search as _search

    work, r, _ = tiny_run
    out = _search(work, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed after generation 2/2" in out.stdout
    assert "loading calibration tables" in out.stdout
    again = json.loads((work / "results.json").read_text())
    assert again["best"] == r["best"] and again["history"] == r["history"]


def test_committed_checkpoint_samples_are_recognisable_digits():
    """64 samples, 10 quad-DDIM steps. Measured mean confidence over 4 noise seeds on this CPU: 0.958-0.986
    (uniform and quad); 100-step samples: 0.986 (card.json). A broken or random model scores < 0.6, so 0.9."""
    spec = models.get_spec("mnist-small")
    model = models.build_model(spec)
    params = checkpoint.load_params(ROOT / "checkpoints" / "mnist-small" / "ema_params.msgpack", spec)
    abar = jnp.asarray(diffusion.alphas_cumprod(), jnp.float32)
    noise = jax.random.normal(jax.random.key(0), (64, 28, 28, 1))
    labels = jnp.arange(64) % 10
    x = jax.jit(lambda p: diffusion.ddim_sample(lambda x, t, y: model.apply({"params": p}, x, t, y), abar,
                                                diffusion.quad_timesteps(10), noise, labels))(params)
    probs, _ = metrics.ClassifierFeatures.load().batched(np.asarray(x))
    assert probs.max(-1).mean() > 0.9
    assert (probs.argmax(-1) == np.asarray(labels)).mean() > 0.85


def test_committed_classifier_accuracy():
    from tmpq_jax import data

    held = data.mnist("heldout")
    probs, _ = metrics.ClassifierFeatures.load().batched(held.images)
    assert (probs.argmax(-1) == held.labels).mean() >= 0.97


@pytest.mark.slow
def test_search_with_inception_fid_as_fitness(tmp_path, fid_cache):
    from conftest import run_tiny_search as _search

    np.savez(tmp_path / "fid_reference.npz", images=data.to_unit_range(data.mnist("heldout").images[:24]))
    work = tmp_path / "run"
    out = _search(work, f"--config.fid_cache={fid_cache}", "--config.metric=inception_fid",
                  "--config.report_metrics=('classifier_fd',)", "--config.fid_batch=8")
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((work / "results.json").read_text())
    assert r["metric_name"] == "inception_fid" and r["report_metric_names"] == ["classifier_fd"]
    fits = [h["best"] for h in r["history"]]
    assert all(np.isfinite(fits)) and fits == sorted(fits, reverse=True)
    assert r["best"]["search"]["fitness"] > 0 and r["best"]["report"]["classifier_fd"]["value"] > 0


@pytest.mark.slow  # 283 s here (217 sensitivity probes on the tiny config); the pieces have fast tests of their own
def test_local_search_end_to_end_counts_its_sensitivity_runs(tmp_path, fid_cache):
    """The tiny search with algorithm='local': sensitivities cached in the workdir and counted, the knapsack
    start in the first population, every candidate within the budget."""
    from conftest import run_tiny_search as _search

    np.savez(tmp_path / "fid_reference.npz", images=data.to_unit_range(data.mnist("heldout").images[:24]))
    work = tmp_path / "run"
    out = _search(work, f"--config.fid_cache={fid_cache}", "--config.algorithm=local", "--config.reconstruct=False",
                  "--config.sensitivity_samples=4", "--config.report_metrics=('teacher_mse',)",
                  "--config.knapsack_weights=(0.5,)", "--config.dp_per_group=3", "--config.dp_samples=4",
                  "--config.baselines=('greedy_bits',)")
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((work / "results.json").read_text())
    z = np.load(work / "sensitivities.npz")
    L = r["model"]["quantized_sites"]
    from tmpq_jax.search import run as run_mod

    sys.path.insert(0, str(ROOT / "experiments" / "configs"))
    import tiny

    from tmpq_jax.search import sensitivity

    cfg = tiny.get_config()
    budget = run_mod.build_problem(cfg).budget  # pinned operands (8-bit probabilities) are not probed
    searched = int(np.sum(np.asarray(budget.fixed_w) == 0) + np.sum(np.asarray(budget.fixed_a) == 0))
    probes = sensitivity.probes(budget, cfg.sensitivity_probe_bits, cfg.sensitivity_mac_share)
    assert searched < 2 * L and 0 < len(probes) < searched  # only the sites holding mac_share of the MACs
    assert int(z["runs"]) == r["timing"]["sensitivity_runs"] == 1 + len(probes)  # all-top + one 5-bit probe each
    assert z["w_damage"].shape == z["a_damage"].shape == (L, 4) and np.all(z["a_damage"][:, 0] == 0)
    assert r["timing"]["sampling_runs"] >= r["timing"]["sensitivity_runs"]
    first = [h for h in r["history"] if h["generation"] == 0][0]
    assert first["feasible_fraction"] == 1.0
    assert r["best"]["within_budget"] and r["best"]["bitops"] <= r["budget_bitops"]
    # chosen on the select noise among the search's top-k, greedy_bits and the warm start (rescore_starts)
    assert r["best"]["search"]["select_metric"] == "teacher_inception"  # the default's select metric
    assert "by teacher_inception on the select noise" in r["best"]["search"]["note"]
    assert r["best"]["search"]["fitness"] is not None  # also when a warm start wins
    assert "knapsack (weights' share 0.5)" in out.stdout and "timestep DP for the knapsack bits" in out.stdout
    # the knapsack start, its DP schedule and greedy_bits fill the first population after the seed
    assert r["timing"]["sensitivities_seconds"] > 0
