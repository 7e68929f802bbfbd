"""The README's table of every method over seeds, generated from a search benchmark JSON (issue 17).

Each cell is one (N, method, seed) row of experiments/search_benchmark.py: held-out Inception FID [95%] / classifier
FD, and both as ratios to `greedy_bits` of the same N, seed and select metric. The last column is the ratio of
Inception FID over the seeds that ran: mean and [min, max].

python experiments/benchmark_table.py benchmarks/search_benchmark_o1_cpu.json --suffix ^teacher_inception \
    --readme README.md      # rewrites the table between <!-- methods-table --> and <!-- /methods-table -->
python experiments/benchmark_table.py benchmarks/search_benchmark_deviation_cpu.json \
    --methods local,greedy_bits,knapsack --marker deviation-table --readme README.md
"""

import argparse
import json
import re
from pathlib import Path

METHOD_LABELS = (
    ("local", "local search"),
    ("greedy_bits", "`greedy_bits`"),
    ("knapsack", "knapsack start alone"),
    ("steps_then_bits", "steps-then-bits"),
    ("evolution", "reference GA (`evolution`)"),
    ("timestep_only", "timestep-only"),
    ("precision_only", "precision-only"),
    ("random", "random search with repair"),
)
MARKER = "methods-table"  # the README block is <!-- MARKER --> ... <!-- /MARKER -->


def ratio(row: dict, greedy: dict, metric: str) -> float:
    return row["heldout"][metric]["value"] / greedy["heldout"][metric]["value"]


def cell(row: dict | None, greedy: dict | None) -> str:
    """'25.8 [24.5, 27.3] / 22.0 (0.93x / 0.78x)'; the ratios are left out for greedy itself or without it."""
    if row is None or "heldout" not in row:
        return "not run"
    fid, cfd = row["heldout"]["inception_fid"], row["heldout"]["classifier_fd"]
    lo, hi = fid["ci95"]
    text = f"{fid['value']:.1f} [{lo:.1f}, {hi:.1f}] / {cfd['value']:.1f}"
    if greedy is not None and "heldout" in greedy and row is not greedy:
        text += f" ({ratio(row, greedy, 'inception_fid'):.2f}x / {ratio(row, greedy, 'classifier_fd'):.2f}x)"
    return text


def methods_table(rows: dict, num_steps=(10, 5), seeds=(0, 1, 2), suffix: str = "", methods=None) -> str:
    """Markdown: one line per (N, method) (`methods`: a subset of METHOD_LABELS' names, default all), one column
    per seed, then the Inception FID ratio over seeds."""
    labels = [(m, label) for m, label in METHOD_LABELS if methods is None or m in methods]
    unknown = set(methods or ()) - {m for m, _ in METHOD_LABELS}
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; valid: {[m for m, _ in METHOD_LABELS]}")
    lines = ["| N | method | " + " | ".join(f"seed {s}" for s in seeds) + " | Inception FID ratio, mean [min, max] |",
             "|---|---|" + "---|" * (len(seeds) + 1)]
    for n in num_steps:
        for method, label in labels:
            cells, ratios = [], []
            for s in seeds:
                row = rows.get(f"N{n}/seed{s}/{method}{suffix}")
                greedy = rows.get(f"N{n}/seed{s}/greedy_bits{suffix}")
                cells.append(cell(row, greedy))
                if row is not None and "heldout" in row and greedy is not None and "heldout" in greedy:
                    ratios.append(ratio(row, greedy, "inception_fid"))
            spread = (f"{sum(ratios) / len(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}] ({len(ratios)} "
                      f"seed{'s' if len(ratios) != 1 else ''})") if ratios and method != "greedy_bits" else ""
            lines.append(f"| {n} | {label} | " + " | ".join(cells) + f" | {spread} |")
    return "\n".join(lines)


def replace_table(text: str, table: str, marker: str = MARKER) -> str:
    """Put `table` between the markers <!-- marker --> and <!-- /marker -->; refuses a text without exactly one
    pair."""
    BEGIN, END = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    pattern = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"expected exactly one {BEGIN} ... {END} block, found {len(pattern.findall(text))}")
    return pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benchmark_json", type=Path)
    p.add_argument("--suffix", default="^teacher_inception", help="row suffix: the select metric the rows ran with")
    p.add_argument("--num_steps", default="10,5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="", help="comma-separated subset of the methods (default: all)")
    p.add_argument("--marker", default=MARKER, help="name of the README block to rewrite")
    p.add_argument("--readme", type=Path, help="rewrite the table in this file instead of printing it")
    a = p.parse_args(argv)
    rows = json.loads(a.benchmark_json.read_text())["rows"]
    table = methods_table(rows, tuple(int(n) for n in a.num_steps.split(",")),
                          tuple(int(s) for s in a.seeds.split(",")), a.suffix,
                          a.methods.split(",") if a.methods else None)
    if a.readme is None:
        print(table)
    else:
        a.readme.write_text(replace_table(a.readme.read_text(), table, a.marker))
        print(f"wrote the table into {a.readme}")


if __name__ == "__main__":
    main()
