"""Export a searched candidate as a self-contained quantized checkpoint (README "Ship the result").

python experiments/export.py --workdir runs/default --candidate best --out runs/default/export_best
python experiments/export.py --workdir runs/default --candidate best --format diffusers --out runs/default/hf_best

--format tmpq (default) writes DIR/model.safetensors (packed integer weight codes, scales, activation quantizers per
timestep group, the other parameters in f32) and DIR/quant_config.json (model, sampler, timesteps, bit map, BitOPs,
numerics); `experiments/generate.py --model DIR` samples from it without the search. --format diffusers writes the
dequantized weights as a diffusers folder with PyTorch names. The quantizer tables are the search's (loaded from
WORKDIR/quant_tables.msgpack; recalibrated, with a message, only if missing or made under other settings).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tmpq_jax.cpu_flags import apply_cpu_xla_flags  # noqa: E402
apply_cpu_xla_flags()  # before JAX starts: LLVM -O1 on CPU-only machines (tmpq_jax/cpu_flags.py)
from experiments import evaluate as ev  # noqa: E402

FORMATS = ("tmpq", "diffusers")
FLAGS = flags.FLAGS


def define_flags():
    """The command line (defined only when run as a script, so the module imports next to others)."""
    flags.DEFINE_string("workdir", None, "Workdir of a finished search (results.json).")
    flags.DEFINE_string("candidate", "best", "best, a baseline of results.json (e.g. uniform_w8a8) or pareto_<i>.")
    flags.DEFINE_string("out", None, "Output folder.")
    flags.DEFINE_enum("format", "tmpq", FORMATS, "tmpq: quantized checkpoint; diffusers: dequantized diffusers folder.")


def exportable_candidates(results: dict) -> dict[str, dict]:
    """name -> results.json entry of every quantized candidate: best, the feasible baselines, pareto_<i>."""
    return {k: e for k, e in ev.available_candidates(results).items() if k != "reference"}


def resolve(workdir: Path, name: str) -> tuple[dict, dict]:
    """(results, candidate entry), checked before any model is loaded."""
    results = ev._load_results(workdir)
    cands = exportable_candidates(results)
    if name == "reference":
        raise ValueError("candidate 'reference' is the full-precision sampler: nothing to quantize; valid: "
                         f"{list(cands)}")
    if name not in cands:
        raise ValueError(f"unknown candidate {name!r}; valid: {list(cands)}")
    return results, cands[name]


def export(workdir: str | Path, name: str, out: str | Path, fmt: str = "tmpq") -> Path:
    """Export one candidate of a finished search; returns the written folder."""
    from tmpq_jax import deploy, quant
    from tmpq_jax.search import run

    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is invalid; valid: {FORMATS}")
    workdir, out = Path(workdir), Path(out)
    results, entry = resolve(workdir, name)
    c = ev._config(results)
    with jax.default_matmul_precision(c.get("matmul_precision", "highest")):
        problem = run.build_problem(c, workdir)
        tables = run.calibrate(c, problem, workdir)
    sites = problem.sites
    w = sites.vector_from_map(entry["w_bits"], f"{name}.w_bits")
    a = sites.vector_from_map(entry["a_bits"], f"{name}.a_bits")
    cand = quant.gather_candidate(tables, sites, w, a)
    extra = {"search": {"workdir": str(workdir.resolve()), "fitness": entry.get("fitness"),
                        "matmul_precision": c.get("matmul_precision", "highest"),
                        "sample_batch": int(c.sample_batch), "prompts": list(problem.prompts),
                        "negative_prompt": c.get("negative_prompt", "")}}
    target = out if fmt == "tmpq" else Path(tempfile.mkdtemp(prefix="tmpq-export-"))
    deploy.export_quantized(target, problem.spec, problem.params, sites, cand, np.asarray(entry["timesteps"]),
                            name=name, source_sha256=problem.checkpoint_sha, extra=extra)
    if fmt == "diffusers":
        deploy.export_diffusers(deploy.read_quantized(target), out)
    elif problem.spec.conditioning == "text":
        copy_text_encoder(Path(problem.spec.source), out)
    return out


def copy_text_encoder(source: Path, out: Path) -> None:
    """A text model's `text_encoder/` and `tokenizer/` (full precision, not part of the UNet's BitOPs), so that
    `generate.py --prompts` can encode new prompts from the export alone."""
    import shutil

    for name in ("text_encoder", "tokenizer"):
        if (source / name).is_dir():
            shutil.copytree(source / name, out / name, dirs_exist_ok=True)
        else:
            print(f"note: {source / name} is missing; generate.py --prompts will need --prompt_embeds", flush=True)


def main(argv):
    del argv
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required")
    t0 = time.time()
    out = export(FLAGS.workdir, FLAGS.candidate, FLAGS.out, FLAGS.format)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {FLAGS.format} export of {FLAGS.candidate!r} to {out} ({size / 2**20:.2f} MiB) in "
          f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
