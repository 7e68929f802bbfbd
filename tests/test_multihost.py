"""Multi-host runs: only process 0 writes files (every other process computes the same results silently)."""

import jax
import numpy as np

from tmpq_jax import checkpoint
from tmpq_jax.search import run as search_run
from tmpq_jax.search.fitness import gather
from tmpq_jax.text import PromptEmbeddings, save_prompt_embeds


def test_only_process_zero_writes(tmp_path, monkeypatch):
    pe = PromptEmbeddings(("a",), np.zeros((1, 77, 4), np.float32), np.zeros((1, 77, 4), np.float32), "t")
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert not checkpoint.is_primary()
    checkpoint.save_tree(tmp_path / "tree.msgpack", {"a": np.ones(3)})
    checkpoint.write_json(tmp_path / "x.json", {"a": 1})
    save_prompt_embeds(tmp_path / "pe.npz", pe)
    search_run.write_outputs(tmp_path, {}, [], {"best": np.zeros((1, 4, 4, 1))}, {})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    checkpoint.write_json(tmp_path / "x.json", {"a": 1})
    save_prompt_embeds(tmp_path / "pe.npz", pe)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pe.npz", "x.json"]


def test_gather_is_identity_on_one_process():
    x = jax.numpy.arange(6).reshape(2, 3)
    assert gather(x) is x
