"""experiments/benchmark_table.py: the README's methods table from benchmark rows, without a model."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import benchmark_table as bt  # noqa: E402


def row(fid, lo, hi, cfd):
    return {"heldout": {"inception_fid": {"value": fid, "ci95": [lo, hi]}, "classifier_fd": {"value": cfd}}}


ROWS = {
    "N10/seed0/greedy_bits^ti": row(28.0, 26.5, 29.5, 20.0),
    "N10/seed0/local^ti": row(25.2, 24.0, 26.0, 22.0),
    "N10/seed1/greedy_bits^ti": row(30.0, 29.0, 31.0, 40.0),
    "N10/seed1/local^ti": row(33.0, 32.0, 34.0, 20.0),
    "N10/seed0/random": row(1.0, 0.5, 1.5, 1.0),   # another suffix: never mixed in
    "N10/seed2/local^ti": row(26.0, 25.0, 27.0, 21.0),  # no greedy row for seed 2: no ratio
}


@pytest.mark.parametrize("key, greedy_key, expected", [
    ("N10/seed0/local^ti", "N10/seed0/greedy_bits^ti", "25.2 [24.0, 26.0] / 22.0 (0.90x / 1.10x)"),
    ("N10/seed1/local^ti", "N10/seed1/greedy_bits^ti", "33.0 [32.0, 34.0] / 20.0 (1.10x / 0.50x)"),
    ("N10/seed0/greedy_bits^ti", "N10/seed0/greedy_bits^ti", "28.0 [26.5, 29.5] / 20.0"),
    ("N10/seed2/local^ti", "N10/seed2/greedy_bits^ti", "26.0 [25.0, 27.0] / 21.0"),
    ("N10/seed0/timestep_only^ti", "N10/seed0/greedy_bits^ti", "not run"),
])
def test_cell(key, greedy_key, expected):
    assert bt.cell(ROWS.get(key), ROWS.get(greedy_key)) == expected


def test_methods_table_rows_columns_and_ratio_spread():
    lines = bt.methods_table(ROWS, num_steps=(10,), seeds=(0, 1, 2), suffix="^ti").splitlines()
    assert len(lines) == 2 + len(bt.METHOD_LABELS)
    local = lines[2].split(" | ")
    assert local[1] == "local search"
    assert local[4] == "26.0 [25.0, 27.0] / 21.0"
    assert local[5] == "1.00x [0.90, 1.10] (2 seeds) |"   # mean of 0.90 and 1.10; seed 2 has no greedy row
    random = [line for line in lines if "random search" in line][0]
    assert random.count("not run") == 3                    # the row without the suffix is not used
    greedy = lines[3].split(" | ")
    assert greedy[-1] == " |"                              # no ratio for greedy itself


def test_methods_subset_keeps_the_label_order_and_refuses_unknown_names():
    lines = bt.methods_table(ROWS, num_steps=(10,), seeds=(0,), suffix="^ti", methods=["knapsack", "local"])
    assert [line.split(" | ")[1] for line in lines.splitlines()[2:]] == ["local search", "knapsack start alone"]
    with pytest.raises(ValueError, match=r"unknown methods \['lokal'\]"):
        bt.methods_table(ROWS, methods=["lokal"])


def test_replace_table_between_markers_only():
    BEGIN, END = "<!-- methods-table -->", "<!-- /methods-table -->"
    text = f"intro\n{BEGIN}\nold | table\n{END}\nafter\n"
    assert bt.replace_table(text, "new") == f"intro\n{BEGIN}\nnew\n{END}\nafter\n"
    other = "<!-- other -->\nx\n<!-- /other -->"
    assert bt.replace_table(text + other, "y", "other") == text + "<!-- other -->\ny\n<!-- /other -->"
    with pytest.raises(ValueError, match="found 0"):
        bt.replace_table("no markers", "new")
    with pytest.raises(ValueError, match="found 2"):
        bt.replace_table(text + text, "new")
