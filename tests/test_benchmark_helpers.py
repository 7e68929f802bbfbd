"""tmpq_jax.benchmark helpers that need no model: one writer per output JSON."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tmpq_jax.benchmark import sole_writer

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_writer_of_the_same_out_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "bench.json"
    with sole_writer(out):
        with pytest.raises(RuntimeError, match=rf"bench.json is being written by pid {os.getpid()} on .*pass another --out"):
            with sole_writer(out):
                pass
        with sole_writer(tmp_path / "other.json"):  # another --out is free
            pass
    with sole_writer(out):  # released on exit
        pass


def test_the_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "bench.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from tmpq_jax.benchmark import sole_writer
            with sole_writer({str(out)!r}):
                print("held", flush=True)
                time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"pid {holder.pid} on"):
            with sole_writer(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with sole_writer(out):  # a killed holder leaves no stale lock
        pass


@pytest.mark.parametrize("script", ["quant_quality.py", "search_benchmark.py", "headroom.py"])
def test_benchmark_scripts_refuse_a_held_out_before_any_work(tmp_path, script):
    out = tmp_path / "bench.json"
    with sole_writer(out):
        proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), f"--out={out}",
                               f"--workdir={tmp_path / 'work'}"], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
    assert proc.returncode != 0
    assert "is being written by pid" in proc.stderr
    assert not (tmp_path / "work").exists()
    assert not out.exists()
