"""Re-evaluate the candidates of a finished search on fresh held-out noise, with paired bootstrap intervals.

python experiments/evaluate.py --workdir runs/default --num_samples 1000 --noise_seed 7 --out runs/default/eval_7.json
    [--candidates best,uniform_w6a6] [--metrics classifier_fd,inception_fid,teacher_mse]
    [--reference mnist-heldout] [--bootstrap 1000] [--compare_to uniform_w6a6]

Candidates are `reference` (the FP reference sampler), `best` and every feasible baseline of `results.json`; each is
re-sampled on `NoiseSet(noise_seed, "report", num_samples)`, i.e. noise of the purpose 'report', which the search
never selects on (selection uses the purposes 'fitness' and 'select'). Samples are cached in
`WORKDIR/eval_<noise_seed>/samples_<name>.npz` (images in [0, 1]) and reused when present.

Intervals are 95% bootstrap intervals over the noise rows: the percentile interval of the replicates after shifting
them by their bias (see `_interval`; FD and KID replicates are biased upwards). One set of resampled row indices is
shared by all candidates (a paired bootstrap: every candidate sees the same resampled noise), so the ratio of a
candidate's metric to the `--compare_to` candidate's has an interval from the same resamples. KID is an unbiased
estimate that can be <= 0 (it is at small n when two distributions are close), so a ratio of KIDs means nothing: for
KID metrics the paired difference (candidate - compare_to) is given instead (`difference_to_<name>`).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax.cpu_flags import apply_cpu_xla_flags  # noqa: E402
apply_cpu_xla_flags()  # before JAX starts: LLVM -O1 on CPU-only machines (tmpq_jax/cpu_flags.py)
from tmpq_jax import data, metrics as M  # noqa: E402
from tmpq_jax.search import fitness  # noqa: E402
from tmpq_jax.search.cache import cache_key, key_diff  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
NOISE_PURPOSE = "report"  # the search selects on 'fitness' and 'select' noise only
# metric -> (feature space, kind); 'pixels' is the identity on images in [-1, 1]
SUPPORTED = {
    "classifier_fd": ("classifier", "frechet"),
    "inception_fid": ("inception", "frechet"),
    "kid_classifier": ("classifier", "kid"),
    "kid_inception": ("inception", "kid"),
    "teacher_mse": ("pixels", "paired"),
    "teacher_classifier": ("classifier", "paired"),
    "teacher_inception": ("inception", "paired"),
}


# --- inputs ---------------------------------------------------------------------------------------------------------


def _load_results(workdir: Path) -> dict:
    if not workdir.is_dir():
        raise FileNotFoundError(f"--workdir {str(workdir)!r} does not exist; pass the workdir of a finished search")
    path = workdir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: --workdir {str(workdir)!r} holds no finished search "
                                "(run experiments/search.py to completion first)")
    return json.loads(path.read_text())


def available_candidates(results: dict) -> dict[str, dict]:
    """name -> results.json entry, for the FP reference, the best, every feasible baseline and every feasible point
    of the front (`pareto_<i>`, one per budget, ascending)."""
    out = {"reference": results["reference"], "best": results["best"]}
    out.update({k: e for k, e in results.get("baselines", {}).items() if not e.get("infeasible")})
    out.update({f"pareto_{i}": e for i, e in enumerate(results.get("pareto", [])) if not e.get("infeasible")})
    return out


def _split(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [v.strip() for v in value if v and v.strip()]


def _check_reference(reference: str) -> None:
    from tmpq_jax.metrics.fid import REFERENCE_SETS

    if reference in REFERENCE_SETS:
        return
    if reference.endswith(".npz") and Path(reference).is_file():
        return
    raise ValueError(f"--reference={reference!r} is invalid; valid: a known set {list(REFERENCE_SETS)} or an "
                     "existing .npz of images (or, for inception_fid only, of Inception statistics)")


def _validate(results: dict, candidates, num_samples, metric_names, reference, bootstrap):
    """Every argument checked before any model is loaded; errors name the bad value and the valid choices."""
    avail = available_candidates(results)
    names = _split(candidates) or list(avail)
    infeasible = sorted(k for k, e in results.get("baselines", {}).items() if e.get("infeasible"))
    for name in names:
        if name not in avail:
            why = " (that baseline is marked infeasible in results.json)" if name in infeasible else ""
            raise ValueError(f"unknown candidate {name!r}{why}; valid: {list(avail)}")
    names = list(dict.fromkeys(names))
    c = results["config"]
    metric_names = _split(metric_names) or list(c.get("report_metrics", ()))
    if not metric_names:
        raise ValueError(f"no metrics: results.json config.report_metrics is empty; pass --metrics, valid: "
                         f"{list(SUPPORTED)}")
    for name in metric_names:
        if name not in SUPPORTED:
            raise ValueError(f"unknown metric {name!r}; valid: {list(SUPPORTED)}")
    metric_names = list(dict.fromkeys(metric_names))
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 2:
        raise ValueError(f"num_samples={num_samples!r} is invalid; valid: an integer >= 2 (a covariance needs two "
                         "samples)")
    if not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise ValueError(f"bootstrap={bootstrap!r} is invalid; valid: an integer >= 0 (0: no intervals)")
    reference = reference or c.get("report_reference", "mnist-heldout")
    shape = tuple(results["model"].get("image_shape", results["model"]["sample_shape"]))
    needs_ref = [m for m in metric_names if SUPPORTED[m][1] != "paired"]
    if needs_ref:
        if reference.startswith("mnist-") and shape != fitness.MNIST_SHAPE:
            raise ValueError(f"--reference={reference!r} is MNIST data, but the model makes {shape} samples (metrics "
                             f"{needs_ref} compare with it); valid: an .npz of your data's images or statistics")
        _check_reference(reference)
    if shape != fitness.MNIST_SHAPE:
        bad = [m for m in metric_names if SUPPORTED[m][0] == "classifier"]
        if bad:
            raise ValueError(f"metrics {bad} use the MNIST classifier, but the model makes {shape} samples; valid: "
                             f"{[m for m, (f, _) in SUPPORTED.items() if f != 'classifier']}")
    return names, metric_names, reference


def _config(results: dict):
    import ml_collections

    c = ml_collections.ConfigDict(results["config"])
    ckpt = Path(c.checkpoint)
    if not ckpt.is_file() and not ckpt.is_absolute() and (REPO_ROOT / ckpt).is_file():
        c.checkpoint = str(REPO_ROOT / ckpt)  # the search ran from the repository root
    return c


def _candidate_key(entry: dict, c, name: str, noise_set, model_sha: str) -> dict:
    """What a sample file is made from (`cache.cache_key`): the model's weights digest, every setting that changes
    the samples, the candidate and the noise; a file with another key (or none) is sampled again."""
    noise = noise_set.describe()
    if name == "reference":
        return cache_key("teacher", c, model_sha, noise=noise, timesteps=list(entry["timesteps"]))
    return cache_key("samples", c, model_sha, noise=noise, **{k: entry[k] for k in ("timesteps", "w_bits", "a_bits")})


# --- sampling -------------------------------------------------------------------------------------------------------


class _Sampler:
    """Builds the problem, tables and evaluator only when some candidate has to be sampled; samples at the search's
    `matmul_precision`, as the search did."""

    def __init__(self, c, workdir: Path):
        self.c, self.workdir, self._parts = c, workdir, None
        self.precision = c.get("matmul_precision", "highest")

    def parts(self):
        if self._parts is None:
            from tmpq_jax.search import run

            with jax.default_matmul_precision(self.precision):
                problem = run.build_problem(self.c, self.workdir)
                tables = run.calibrate(self.c, problem, self.workdir)
            self._parts = run, problem, run.make_evaluator(self.c, problem, tables)
        return self._parts

    def sample(self, name: str, entry: dict, noise_set) -> np.ndarray:
        """Images (n, H, W, C) in [-1, 1]."""
        run, problem, evaluator = self.parts()
        with jax.default_matmul_precision(self.precision):
            if name == "reference":
                return run.teacher_images(self.c, problem, evaluator, noise_set, self.workdir)
            ts = np.asarray(entry["timesteps"], np.int32)
            w = problem.sites.vector_from_map(entry["w_bits"], f"{name}.w_bits")
            a = problem.sites.vector_from_map(entry["a_bits"], f"{name}.a_bits")
            return evaluator.sample(ts[None], w[None], a[None], noise_set)[0]


def _images(name, entry, c, noise_set, shape, eval_dir: Path, sampler: _Sampler,
            model_sha: str) -> tuple[np.ndarray, Path]:
    """Unit-range images of one candidate: the cached file if its key matches, else freshly sampled and saved."""
    path = eval_dir / f"samples_{name}.npz"
    key = _candidate_key(entry, c, name, noise_set, model_sha)
    want = (noise_set.n, *shape)
    if path.is_file():
        with np.load(path) as z:
            images = np.asarray(z["images"], np.float32) if "images" in z else None
            old_key = json.loads(str(z["cache_key"])) if "cache_key" in z else None
        diff = key_diff(old_key, key)
        if (images is not None and images.shape == want and not diff and np.isfinite(images).all()
                and images.min() >= 0.0 and images.max() <= 1.0):
            print(f"[{name}] reusing {noise_set.n} samples from {path}", flush=True)
            return images, path
        why = (f"made under other settings: {', '.join(diff[:6])}" if old_key is not None else
               "no cache key stored") if diff else f"shape {None if images is None else images.shape}, want {want}"
        print(f"[{name}] {path} does not match ({why}); sampling again", flush=True)
    t0 = time.time()
    print(f"[{name}] sampling {noise_set}", flush=True)
    unit = data.to_unit_range(sampler.sample(name, entry, noise_set))
    if unit.shape != want:
        raise RuntimeError(f"[{name}] sampled images have shape {unit.shape}, expected {want}")
    eval_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, images=unit, cache_key=np.asarray(json.dumps(key, sort_keys=True)), noise_seed=noise_set.seed,
             noise_purpose=noise_set.purpose)
    os.replace(tmp, path)
    print(f"[{name}] sampled in {time.time() - t0:.1f} s -> {path}", flush=True)
    return unit, path


# --- metrics --------------------------------------------------------------------------------------------------------


class _Features:
    """Per feature space: the extractor (images in [0, 1]) and the reference data, each built once."""

    def __init__(self, c, reference: str):
        self.c, self.reference = c, reference
        self._ext, self._clf_ref, self._frechet = None, None, {}

    def extract(self, space: str, unit: np.ndarray) -> np.ndarray:
        if space == "pixels":
            return (unit * 2.0 - 1.0).reshape(len(unit), -1)
        if space == "classifier":
            return np.asarray(fitness.classifier_features(unit * 2.0 - 1.0), np.float64)
        return np.asarray(self.inception().features(unit, progress=False), np.float64)

    def inception(self):
        if self._ext is None:
            self._ext = fitness.inception_extractor(self.c)
        return self._ext

    def _cache(self):
        return self.c.get("fid_cache", "") or None

    def reference_features(self, space: str) -> np.ndarray:
        if space == "classifier":
            if self._clf_ref is None:
                self._clf_ref = np.asarray(fitness.classifier_features(fitness.reference_images(self.reference)),
                                           np.float64)
            return self._clf_ref
        from tmpq_jax.metrics.fid import reference_features

        return np.asarray(reference_features(self.reference, self.inception(), self._cache()), np.float64)

    def frechet(self, space: str) -> M.FrechetToReference:
        if space not in self._frechet:
            if space == "classifier":
                stats = M.feature_stats(self.reference_features("classifier"))
            else:
                from tmpq_jax.metrics.fid import reference_stats

                stats = reference_stats(self.reference, self.inception(), self._cache())
            self._frechet[space] = M.FrechetToReference(*stats)
        return self._frechet[space]


def _metric(name: str, feats: dict, ref_feats: dict, fx: _Features, idx: np.ndarray):
    """(value, bootstrap values (B,)) of one metric for one candidate."""
    space, kind = SUPPORTED[name]
    f = feats[space]
    if kind == "frechet":
        fr = fx.frechet(space)
        return fr.distance(f), (fr.bootstrap(f, idx) if len(idx) else np.empty(0))
    if kind == "kid":
        r = fx.reference_features(space)
        return M.kid(f, r), (M.kid_bootstrap(f, r, idx) if len(idx) else np.empty(0))
    d = np.mean((f - ref_feats[space]) ** 2, axis=1)  # per sample: squared distance / dim (pixels: MSE)
    return float(d.mean()), (d[idx].mean(1) if len(idx) else np.empty(0))


def _num(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _interval(value, boots) -> dict:
    """95% interval of a metric from its bootstrap replicates, centred on the point value (bias-shifted).

    The replicates of FD and KID are biased upwards: a resample with replacement repeats rows, which inflates the
    mean term and shrinks the covariance (FD), and repeated rows enter KID's i != j sums. At small n the whole
    percentile interval can lie above the point value (n=6: all 20 of 20 replicates did). So the replicates are
    shifted by their estimated bias, mean(replicates) - value (Efron and Tibshirani 1993, sec. 10.2), before taking
    the percentile interval (sec. 13.3): the interval states the noise-sampling spread of the reported number.
    """
    v = np.asarray(boots, np.float64)
    v = v[np.isfinite(v)]
    if not len(v) or not math.isfinite(float(value)):
        return {"ci95": [None, None], "bootstrap_bias": None}
    bias = float(v.mean() - value)
    lo, hi = M.percentile_interval(v - bias)
    return {"ci95": [_num(lo), _num(hi)], "bootstrap_bias": _num(bias)}


# --- the job --------------------------------------------------------------------------------------------------------


def evaluate(workdir, candidates=None, num_samples: int = 1000, noise_seed: int = 0, metrics=None, out=None,
             reference: str | None = None, bootstrap: int = 1000, compare_to: str = "uniform_w6a6") -> dict:
    """Re-sample candidates of the finished search in `workdir` on NoiseSet(noise_seed, 'report', num_samples),
    score them with bootstrap intervals, write `out` (JSON) if given, and return the same dict.

    candidates, metrics: lists or comma-separated strings; None/empty: every available candidate, and
    results.json's config.report_metrics. reference: None: config.report_reference.
    """
    workdir = Path(workdir)
    results = _load_results(workdir)
    names, metric_names, reference = _validate(results, candidates, num_samples, metrics, reference, bootstrap)
    num_samples, noise_seed, bootstrap = int(num_samples), int(noise_seed), int(bootstrap)
    c = _config(results)
    shape = tuple(results["model"].get("image_shape", results["model"]["sample_shape"]))
    avail = available_candidates(results)
    noise_set = fitness.NoiseSet(noise_seed, NOISE_PURPOSE, num_samples)
    eval_dir = workdir / f"eval_{noise_seed}"
    command = " ".join(["python experiments/evaluate.py", f"--workdir {shlex.quote(str(workdir))}",
                        f"--candidates {','.join(names)}", f"--num_samples {num_samples}",
                        f"--noise_seed {noise_seed}", f"--metrics {','.join(metric_names)}",
                        f"--reference {shlex.quote(reference)}", f"--bootstrap {bootstrap}",
                        f"--compare_to {compare_to}"] + ([f"--out {shlex.quote(str(out))}"] if out else []))

    # reference data and extractors before any sampling: missing weights or data fail here
    fx = _Features(c, reference)
    spaces = list(dict.fromkeys(SUPPORTED[m][0] for m in metric_names))
    for m in metric_names:
        space, kind = SUPPORTED[m]
        if kind == "frechet":
            fx.frechet(space)
        elif kind == "kid":
            fx.reference_features(space)
        elif space == "inception":
            fx.inception()
    paired = any(SUPPORTED[m][1] == "paired" for m in metric_names)

    from tmpq_jax.search.run import model_sha

    sampler = _Sampler(c, workdir)
    todo = names + (["reference"] if paired and "reference" not in names else [])
    images, paths = {}, {}
    sha = model_sha(c)
    for name in todo:
        images[name], paths[name] = _images(name, avail[name], c, noise_set, shape, eval_dir, sampler, sha)

    # features once per candidate and feature space; one paired set of bootstrap indices for all
    feats = {name: {s: fx.extract(s, images[name]) for s in spaces} for name in todo}
    idx = M.bootstrap_indices(num_samples, bootstrap, seed=noise_seed)
    values, boots = {}, {}
    for name in names:
        for m in metric_names:
            values[name, m], boots[name, m] = _metric(m, feats[name], feats.get("reference", {}), fx, idx)

    ratio_key, diff_key = f"ratio_to_{compare_to}", f"difference_to_{compare_to}"
    if compare_to not in names:
        print(f"--compare_to={compare_to!r} is not among the evaluated candidates {names}: no ratios", flush=True)
    out_candidates = {}
    for name in names:
        entry = avail[name]
        ms = {}
        for m in metric_names:
            ms[m] = {"value": _num(values[name, m]), **_interval(values[name, m], boots[name, m])}
            if compare_to in names and SUPPORTED[m][1] == "kid":  # KID is unbiased and can be <= 0: no ratios
                diff = np.float64(values[name, m]) - np.float64(values[compare_to, m])
                ms[m][diff_key] = {"value": _num(diff), **_interval(diff, boots[name, m] - boots[compare_to, m])}
            elif compare_to in names:
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.float64(values[name, m]) / np.float64(values[compare_to, m])
                    ratio_boot = boots[name, m] / boots[compare_to, m]
                ms[m][ratio_key] = {"value": _num(ratio), **_interval(ratio, ratio_boot)}
        out_candidates[name] = {"bitops": entry["bitops"], "timesteps": list(entry["timesteps"]),
                                "samples": str(paths[name]), "metrics": ms}
    result = {
        "workdir": str(workdir),
        "noise": noise_set.describe(),
        "reference": reference,
        "paired_reference": f"FP reference sampler ({c.reference_steps} steps), same noise",
        "bootstrap": bootstrap,
        "interval": "95% percentile interval of the paired bootstrap replicates shifted by their bias "
                    "(mean(replicates) - value); the same resampled noise rows for every candidate",
        "compare_to": compare_to,
        "candidates": out_candidates,
        "command": command,
    }
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result), flush=True)
    return result


def table(result: dict) -> str:
    """Candidate x metric: value [95% interval], and the ratio to compare_to where computed."""
    noise = result["noise"]
    cands = result["candidates"]
    names = list(next(iter(cands.values()))["metrics"]) if cands else []
    ratio_key, diff_key = f"ratio_to_{result['compare_to']}", f"difference_to_{result['compare_to']}"

    def fmt(d):
        if d is None or d["value"] is None:
            return "-"
        lo, hi = d["ci95"]
        return f"{d['value']:.4g}" + (f" [{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else "")

    width = 34
    lines = [f"held-out evaluation: n={noise['n']}, noise seed {noise['noise_seed']} (purpose "
             f"'{noise['noise_purpose']}'), reference {result['reference']}; paired metrics vs "
             f"{result['paired_reference']}; {result['bootstrap']} paired bootstrap resamples, bias-shifted 95% "
             "intervals",
             f"{'':16s} {'BitOPs':>10s} " + " ".join(f"{n:>{width}s}" for n in names)]
    for name, e in cands.items():
        lines.append(f"{name:16s} {e['bitops']:10.4g} " + " ".join(f"{fmt(e['metrics'][n]):>{width}s}"
                                                                    for n in names))
        if any(k in e["metrics"][n] for n in names for k in (ratio_key, diff_key)):
            lines.append(f"{'  vs ' + result['compare_to'] + ' (ratio; KID: difference)':27.27s} " + " ".join(
                f"{fmt(e['metrics'][n].get(ratio_key, e['metrics'][n].get(diff_key))):>{width}s}" for n in names))
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined when run as a script only, so that importing `evaluate` never clashes with other scripts' flags."""
    flags.DEFINE_string("workdir", None, "Workdir of a finished search (holds results.json).")
    flags.DEFINE_list("candidates", [], "Candidates: reference, best and feasible baselines of results.json "
                      "(default: all of them).")
    flags.DEFINE_integer("num_samples", 1000, "Held-out samples per candidate (>= 2).")
    flags.DEFINE_integer("noise_seed", 0, "Seed of the held-out noise (purpose 'report'); also seeds the bootstrap.")
    flags.DEFINE_list("metrics", [], f"Metrics, of {list(SUPPORTED)} (default: results.json "
                      "config.report_metrics).")
    flags.DEFINE_string("reference", None, "Reference data of FD/KID metrics (default: config.report_reference).")
    flags.DEFINE_integer("bootstrap", 1000, "Paired bootstrap resamples for the 95% intervals (0: none).")
    flags.DEFINE_string("compare_to", "uniform_w6a6", "Candidate that every metric is also given as a ratio to.")
    flags.DEFINE_string("out", None, "Output JSON file.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if not FLAGS.out:
        raise app.UsageError("--out is required")
    try:
        evaluate(FLAGS.workdir, FLAGS.candidates, FLAGS.num_samples, FLAGS.noise_seed, FLAGS.metrics, FLAGS.out,
                 FLAGS.reference, FLAGS.bootstrap, FLAGS.compare_to)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    define_flags()
    if any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in sys.argv[1:]):
        app.usage(shorthelp="--helpfull" not in sys.argv, writeto_stdout=True)  # absl's own --help exits 1
        sys.exit(0)
    app.run(main)
