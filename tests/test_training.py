import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from tmpq_jax import checkpoint, training

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(num_steps):
    sys.path.insert(0, str(ROOT / "experiments" / "configs"))
    import train_tiny

    c = train_tiny.get_config()
    c.num_steps = num_steps
    return c


@pytest.mark.slow  # about 60 s: a training subprocess killed and resumed (the search's resume runs by default)
def test_killed_training_resumes_to_the_same_state(tmp_path):
    steps = 16
    training.train(tiny_config(steps), str(tmp_path / "straight"))
    ref = checkpoint.load_tree(tmp_path / "straight" / training.STATE_FILE)

    # start the CLI, kill -9 it once its first checkpoint exists
    work = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), "--config",
           str(ROOT / "experiments" / "configs" / "train_tiny.py"), f"--config.num_steps={steps}",
           "--workdir", str(work)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (work / training.STATE_FILE).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(checkpoint.load_tree(work / training.STATE_FILE)["step"])
    assert 0 < killed_at < steps, f"the run was not interrupted mid-way (checkpoint at step {killed_at})"

    out = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from {work / training.STATE_FILE} at step {killed_at}" in out.stdout + out.stderr
    got = checkpoint.load_tree(work / training.STATE_FILE)
    assert int(got["step"]) == steps
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bad_training_config(tmp_path):
    c = tiny_config(4)
    c.batch_size = 0
    with pytest.raises(ValueError, match="batch_size=0.*>= 1"):
        training.train(c, str(tmp_path))
    c = tiny_config(4)
    c.ema_decay = 1.5
    with pytest.raises(ValueError, match=r"ema_decay=1.5.*\[0, 1\)"):
        training.train(c, str(tmp_path))
