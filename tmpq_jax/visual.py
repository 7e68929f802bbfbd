"""PNG sample grids and plots."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """(n, H, W, C) in [0, 1] -> one uint8 (rows*H, cols*W, C) mosaic."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
    for i, im in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = im
    return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


def save_grid(path: str | os.PathLike, images: np.ndarray, ncols: int | None = None, scale: int = 2) -> None:
    from PIL import Image

    g = image_grid(images, ncols)
    im = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def save_plots(workdir: str | os.PathLike, histories: list[dict], logs: dict, results: dict) -> None:
    """search_progress.png (best / median per generation), bitops_vs_metric.png (every candidate seen) and, with a
    front in `results`, pareto.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(h["search"] for h in histories):
        hs = [h for h in histories if h["search"] == name]
        line, = ax.plot([h["generation"] for h in hs], [h["best"] for h in hs], marker="o", label=f"{name} best")
        ax.plot([h["generation"] for h in hs], [h["median"] if h["median"] is not None else np.nan for h in hs],
                ls="--", color=line.get_color(), label=f"{name} median")
    ax.set_xlabel("generation")
    ax.set_ylabel(f"fitness ({results['metric_name']}, n={results['noise']['fitness']['n']}, fitness noise)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(workdir / "search_progress.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, log in logs.items():
        top = np.asarray(log["scores"]).shape[-1] - 1
        fit = np.where(np.asarray(log["level"]) == top, np.asarray(log["scores"])[..., top], np.nan).ravel()
        bops = np.asarray(log["bitops"]).ravel()
        ok = np.isfinite(fit)
        ax.scatter(bops[ok], fit[ok], s=8, alpha=0.5, label=f"{name} candidates")
    for name, entry in [("best", results["best"]), *results["baselines"].items()]:
        if entry.get("search", {}).get("fitness") is not None:
            ax.scatter([entry["bitops"]], [entry["search"]["fitness"]], marker="*", s=120, label=name)
    ax.axvline(results["budget_bitops"], color="k", ls=":", label="budget")
    ax.set_xlabel("BitOPs per image (all sampling steps)")
    ax.set_ylabel(f"fitness ({results['metric_name']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(workdir / "bitops_vs_metric.png", dpi=120)
    plt.close(fig)

    if results.get("pareto"):
        save_pareto_plot(workdir / "pareto.png", results)


def save_pareto_plot(path: str | os.PathLike, results: dict) -> None:
    """One panel per report metric: the front's candidates (BitOPs vs report-noise value), the uniform WxAx
    baselines and the FP reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = results["report_metric_names"]
    rep = results["noise"]["report"]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, m in zip(axes[0], names):
        def val(e):
            return e.get("report", {}).get(m, {}).get("value")

        pts = [(e["bitops"], val(e), e.get("on_front", True)) for e in results["pareto"]
               if not e.get("infeasible") and val(e) is not None]
        if pts:
            x, y, on = (np.asarray(v) for v in zip(*pts))
            ax.plot(x, y, marker="o", label="front (best per budget)")
            ax.scatter(x[~on], y[~on], marker="x", color="r", zorder=3, label="dominated on select noise")
        for name, e in results["baselines"].items():
            if name.startswith("uniform_") and not e.get("infeasible") and val(e) is not None:
                ax.scatter([e["bitops"]], [val(e)], marker="s", label=name)
        if val(results["reference"]) is not None:
            ax.scatter([results["reference"]["bitops"]], [val(results["reference"])], marker="*", s=120,
                       label=f"FP ({results['reference']['steps']} steps)")
        ax.set_xscale("log")
        ax.set_xlabel("BitOPs per image (all sampling steps)")
        ax.set_ylabel(f"{m} (report noise n={rep['n']}, seed {rep['noise_seed']})")
        ax.legend(fontsize=7)
    fig.suptitle(f"reference: {results['references']['report']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
