"""`experiments/evaluate.py`: re-sampling a finished tiny search's candidates on held-out noise, with intervals."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "experiments" / "configs"))
import evaluate as ev  # noqa: E402

N, SEED, B = 6, 3, 20
METRICS = ["classifier_fd", "teacher_mse"]


@pytest.fixture(scope="module")
def search_dir(tiny_search):
    """The finished tiny end-to-end search (shared with test_end_to_end)."""
    work, results, _ = tiny_search
    return work, results


@pytest.fixture(scope="module")
def evaluated(search_dir):
    work, _ = search_dir
    out = work / "eval.json"
    return ev.evaluate(work, None, N, SEED, METRICS, out, reference="mnist-heldout", bootstrap=B), out


def test_writes_samples_of_every_feasible_candidate(search_dir, evaluated):
    work, results = search_dir
    r, out = evaluated
    names = ["reference", "best"] + [k for k, e in results["baselines"].items() if not e.get("infeasible")]
    front = [f"pareto_{i}" for i, e in enumerate(results["pareto"]) if not e.get("infeasible")]
    assert list(r["candidates"]) == names + front and len(names) == 8 and len(front) == len(results["pareto"]) == 3
    assert json.loads(out.read_text()) == r
    assert r["noise"] == {"n": N, "noise_seed": SEED, "noise_purpose": "report"}
    assert r["reference"] == "mnist-heldout" and r["bootstrap"] == B
    for name in names + front:
        path = work / f"eval_{SEED}" / f"samples_{name}.npz"
        assert r["candidates"][name]["samples"] == str(path)
        images = np.load(path)["images"]
        assert images.shape == (N, 28, 28, 1) and images.dtype == np.float32
        assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.1
        entry = results["reference"] if name == "reference" else results["best"] if name == "best" else \
            results["pareto"][int(name.split("_")[1])] if name.startswith("pareto_") else results["baselines"][name]
        assert r["candidates"][name]["bitops"] == entry["bitops"]
        assert r["candidates"][name]["timesteps"] == entry["timesteps"]
    # different candidates sample different images from the same noise
    a, b = (np.load(work / f"eval_{SEED}" / f"samples_{k}.npz")["images"] for k in ("uniform_w8a8", "uniform_w6a6"))
    assert np.abs(a - b).max() > 1e-3


def test_metrics_intervals_and_paired_ratios(evaluated):
    r, _ = evaluated
    cands = r["candidates"]
    assert cands["reference"]["metrics"]["teacher_mse"]["value"] == 0.0
    assert cands["reference"]["metrics"]["teacher_mse"]["ci95"] == [0.0, 0.0]
    for name, e in cands.items():
        assert set(e["metrics"]) == set(METRICS)
        fd = e["metrics"]["classifier_fd"]
        lo, hi = fd["ci95"]
        assert fd["value"] > 0 and lo <= fd["value"] <= hi and lo < hi, (name, fd)
        if name != "reference":
            mse = e["metrics"]["teacher_mse"]
            assert mse["value"] > 0 and mse["ci95"][0] <= mse["value"] <= mse["ci95"][1], (name, mse)
        for m in METRICS:
            ratio = e["metrics"][m]["ratio_to_uniform_w6a6"]
            assert ratio["value"] == pytest.approx(e["metrics"][m]["value"] / cands["uniform_w6a6"]["metrics"][m]
                                                   ["value"])
    for m in METRICS:
        assert cands["uniform_w6a6"]["metrics"][m]["ratio_to_uniform_w6a6"] == {
            "value": 1.0, "ci95": [1.0, 1.0], "bootstrap_bias": 0.0}


def test_metrics_match_a_direct_computation(search_dir, evaluated):
    from tmpq_jax import metrics
    from tmpq_jax.search import fitness

    work, _ = search_dir
    r, _ = evaluated
    ref_feats = fitness.classifier_features(fitness.reference_images("mnist-heldout"))
    fr = metrics.FrechetToReference(*metrics.feature_stats(ref_feats))
    teacher = np.load(work / f"eval_{SEED}" / "samples_reference.npz")["images"]
    for name in ("best", "uniform_w8a8"):
        x = np.load(work / f"eval_{SEED}" / f"samples_{name}.npz")["images"]
        got = r["candidates"][name]["metrics"]
        assert got["classifier_fd"]["value"] == pytest.approx(fr.distance(fitness.classifier_features(x * 2 - 1)),
                                                              rel=1e-6)
        # pixel MSE in [-1, 1] units, as the search's teacher_mse
        assert got["teacher_mse"]["value"] == pytest.approx(np.mean((2 * x - 2 * teacher) ** 2), rel=1e-5)


def test_second_call_reuses_the_samples(search_dir, evaluated, capsys):
    work, _ = search_dir
    r, _ = evaluated
    paths = {k: Path(e["samples"]) for k, e in r["candidates"].items()}
    mtimes = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    again = ev.evaluate(work, None, N, SEED, METRICS, None, reference="mnist-heldout", bootstrap=B)
    out = capsys.readouterr().out
    assert all(f"[{k}] reusing {N} samples" in out for k in paths), out
    assert "sampling NoiseSet" not in out
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == mtimes
    assert again["candidates"] == r["candidates"]
    assert f"n={N}, noise seed {SEED}" in out and "reference mnist-heldout" in out


def test_reproduces_the_search_report(search_dir):
    """On the search's own report noise, the re-sampled numbers are the search's reported numbers: the bits and
    timesteps read back from results.json are the candidate's, and the noise is the same."""
    work, results = search_dir
    c = results["config"]
    r = ev.evaluate(work, "reference,best", c["final_samples"], c["report_noise_seed"], "classifier_fd", None,
                    bootstrap=0)
    for name in ("reference", "best"):
        got = r["candidates"][name]["metrics"]["classifier_fd"]
        assert got["value"] == pytest.approx(results[name]["report"]["classifier_fd"]["value"], rel=1e-4)
        assert got["ci95"] == [None, None]
    assert "ratio_to_uniform_w6a6" not in r["candidates"]["best"]["metrics"]["classifier_fd"]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(candidates="best,nonesuch"), "'nonesuch'"),
    (dict(metrics="classifier_fd,nonesuch_metric"), "'nonesuch_metric'"),
    (dict(num_samples=1), "num_samples=1"),
    (dict(reference="no-such-set"), "'no-such-set'"),
])
def test_bad_arguments_fail_before_sampling(search_dir, kwargs, needle):
    work, _ = search_dir
    args = dict(candidates=None, num_samples=N, noise_seed=SEED + 100, metrics=METRICS, out=None, bootstrap=B)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle) as e:
        ev.evaluate(work, **args)
    assert "valid" in str(e.value)
    assert not (work / f"eval_{SEED + 100}").exists()


def test_missing_workdir_or_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.evaluate(tmp_path / "nowhere", None, N, SEED, METRICS, None)
    with pytest.raises(FileNotFoundError, match="results.json"):
        ev.evaluate(tmp_path, None, N, SEED, METRICS, None)


def _fake_search(work: Path, sample_shape) -> Path:
    """A results.json without a model behind it: enough for the argument checks, which run before any loading."""
    work.mkdir()
    entry = {"timesteps": [750, 0], "w_bits": {}, "a_bits": {}, "bitops": 1}
    results = {"config": {"report_metrics": ["inception_fid"], "report_reference": "mnist-heldout"},
               "model": {"sample_shape": list(sample_shape)}, "reference": {"timesteps": [0], "bitops": 2},
               "best": entry, "baselines": {"uniform_w6a6": entry, "timestep_only": {"infeasible": True}}}
    (work / "results.json").write_text(json.dumps(results))
    return work


def test_mnist_reference_or_classifier_for_other_models_and_infeasible_candidates(tmp_path):
    work = _fake_search(tmp_path / "cifar", (32, 32, 3))
    with pytest.raises(ValueError, match="'mnist-heldout'.*valid"):
        ev.evaluate(work, None, N, SEED, None, None)
    with pytest.raises(ValueError, match="'mnist-train'.*valid"):
        ev.evaluate(work, None, N, SEED, "kid_inception", None, reference="mnist-train")
    with pytest.raises(ValueError, match="teacher_classifier.*valid"):
        ev.evaluate(work, None, N, SEED, "teacher_mse,teacher_classifier", None)
    with pytest.raises(ValueError, match="'timestep_only' .*infeasible.*valid"):
        ev.evaluate(work, "best,timestep_only", N, SEED, "teacher_mse", None)
    assert not (work / f"eval_{SEED}").exists()


def test_command_line_reuses_samples_and_writes_json(search_dir, evaluated):
    work, _ = search_dir
    r, _ = evaluated
    out = work / "cli.json"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "evaluate.py"), f"--workdir={work}",
                           "--candidates=best,uniform_w6a6", f"--num_samples={N}", f"--noise_seed={SEED}", "--reference=mnist-heldout",
                           f"--metrics={','.join(METRICS)}", f"--bootstrap={B}", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[best] reusing" in proc.stdout and "sampling NoiseSet" not in proc.stdout
    cli = json.loads(out.read_text())
    assert list(cli["candidates"]) == ["best", "uniform_w6a6"]
    for name in cli["candidates"]:
        for m in METRICS:  # the same resampled rows (seeded by the noise seed): same values and intervals
            assert cli["candidates"][name]["metrics"][m]["value"] == r["candidates"][name]["metrics"][m]["value"]
            assert cli["candidates"][name]["metrics"][m]["ci95"] == r["candidates"][name]["metrics"][m]["ci95"]
    assert cli["command"].startswith("python experiments/evaluate.py --workdir")


def test_help_exits_zero():
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "evaluate.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--num_samples" in proc.stdout and "--compare_to" in proc.stdout


def test_a_samples_file_without_a_matching_cache_key_is_sampled_again(search_dir, evaluated, tmp_path, capsys):
    """Files of an older version (no key) and files of other noise are never reused, even with the right shape."""
    import shutil

    work, _ = search_dir
    copy = tmp_path / "work"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("eval_*"))
    eval_dir = copy / f"eval_{SEED}"
    eval_dir.mkdir()
    good = np.load(work / f"eval_{SEED}" / "samples_best.npz")
    np.savez(eval_dir / "samples_best.npz", images=good["images"])  # no cache key (an old file)
    ev.evaluate(copy, "best", N, SEED, ["teacher_mse"], None, reference="mnist-heldout", bootstrap=0)
    out = capsys.readouterr().out
    assert "[best]" in out and "(no cache key stored); sampling again" in out and "[best] reusing" not in out
    # a file whose key names another noise seed
    key = json.loads(str(np.load(eval_dir / "samples_best.npz")["cache_key"]))
    np.savez(eval_dir / "samples_best.npz", images=good["images"],
             cache_key=np.asarray(json.dumps({**key, "noise": {**key["noise"], "noise_seed": SEED + 1}})))
    r = ev.evaluate(copy, "best", N, SEED, ["teacher_mse"], None, reference="mnist-heldout", bootstrap=0)
    assert "(made under other settings: noise); sampling again" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(eval_dir / "samples_best.npz")["images"], good["images"])
    assert r["candidates"]["best"]["metrics"]["teacher_mse"]["value"] == \
        evaluated[0]["candidates"]["best"]["metrics"]["teacher_mse"]["value"]


def test_samples_are_drawn_at_the_search_matmul_precision(search_dir):
    import jax
    import ml_collections

    from tmpq_jax.search.fitness import NoiseSet

    seen = []

    class Recorder:
        def sample(self, ts, w, a, noise_set):
            seen.append(jax.config.jax_default_matmul_precision)
            return np.zeros((1, noise_set.n, 28, 28, 1))

    class Problem:
        sites = type("S", (), {"vector_from_map": staticmethod(lambda m, name: np.zeros(1, np.int32))})()

    work, results = search_dir
    c = ml_collections.ConfigDict({**results["config"], "matmul_precision": "high"})
    sampler = ev._Sampler(c, work)
    sampler._parts = (None, Problem(), Recorder())
    sampler.sample("best", results["best"], NoiseSet(0, "report", 2))
    assert seen == ["high"]


def test_kid_is_compared_by_difference_not_ratio(search_dir):
    work, _ = search_dir
    r = ev.evaluate(work, "best,uniform_w6a6", N, SEED, ["kid_classifier", "classifier_fd"], None,
                    reference="mnist-heldout", bootstrap=B)
    best = r["candidates"]["best"]["metrics"]
    kid = best["kid_classifier"]
    assert "ratio_to_uniform_w6a6" not in kid and "ratio_to_uniform_w6a6" in best["classifier_fd"]
    w6 = r["candidates"]["uniform_w6a6"]["metrics"]["kid_classifier"]["value"]
    assert kid["difference_to_uniform_w6a6"]["value"] == pytest.approx(kid["value"] - w6, rel=1e-12)
    lo, hi = kid["difference_to_uniform_w6a6"]["ci95"]
    assert lo <= hi
