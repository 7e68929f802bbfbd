"""XLA flags of CPU-only runs (tmpq_jax/cpu_flags.py); no model."""

import pytest

from tmpq_jax import cpu_flags
from tmpq_jax.search.cache import cache_key


@pytest.mark.parametrize("xla_flags, accelerator, expected", [
    ("", False, "--xla_backend_optimization_level=1"),
    ("--xla_dump_to=/tmp/d", False, "--xla_dump_to=/tmp/d --xla_backend_optimization_level=1"),
    ("--xla_backend_optimization_level=3", False, "--xla_backend_optimization_level=3"),  # the user's level stays
    ("", True, ""),  # accelerators keep XLA's default
    ("--xla_dump_to=/tmp/d", True, "--xla_dump_to=/tmp/d"),
])
def test_cpu_xla_flags(xla_flags, accelerator, expected):
    assert cpu_flags.cpu_xla_flags(xla_flags, accelerator) == expected


@pytest.mark.parametrize("platforms, expected", [
    ("cpu", False), ("cpu,", False), ("cuda", True), ("cpu,cuda", True), ("tpu", True), ("gpu", True),
])
def test_jax_platforms_decides_whether_an_accelerator_may_run(platforms, expected):
    assert cpu_flags.accelerator_installed({"JAX_PLATFORMS": platforms}) is expected


@pytest.mark.parametrize("xla_flags, expected", [
    ("", "default"), ("--xla_dump_to=/x", "default"), ("--xla_backend_optimization_level=1", "1"),
    ("--xla_backend_optimization_level=2 --xla_backend_optimization_level=0", "0"),  # the last one wins, as in XLA
])
def test_backend_opt_level(xla_flags, expected):
    assert cpu_flags.backend_opt_level({"XLA_FLAGS": xla_flags}) == expected


def test_apply_sets_the_flag_on_a_cpu_only_machine_and_refuses_once_jax_started():
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=2"}
    assert cpu_flags.apply_cpu_xla_flags(env) == "--xla_backend_optimization_level=2"  # nothing to change
    import jax

    jax.devices()  # backends started: a flag set now would be ignored, so it is an error
    with pytest.raises(RuntimeError, match="already started"):
        cpu_flags.apply_cpu_xla_flags({"JAX_PLATFORMS": "cpu"})
    assert cpu_flags.apply_cpu_xla_flags({"JAX_PLATFORMS": "cuda"}) == ""  # nothing to set, no error


def test_the_llvm_level_is_part_of_every_cache_key(monkeypatch):
    import ml_collections

    c = ml_collections.ConfigDict({"sample_batch": 16})
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=1")
    at_1 = cache_key("samples", c, "sha")
    monkeypatch.setenv("XLA_FLAGS", "")
    at_default = cache_key("samples", c, "sha")
    assert at_1["xla_backend_optimization_level"] == "1" and at_default["xla_backend_optimization_level"] == "default"
    assert {k for k in at_1 if at_1[k] != at_default[k]} == {"xla_backend_optimization_level"}
