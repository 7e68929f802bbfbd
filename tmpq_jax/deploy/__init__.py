"""Shipping a chosen candidate (issue 18): integer weight codes packed for the file. The exporter and runtime are
not built yet; `packing` is the file format's code layout."""

from tmpq_jax.deploy.packing import codes_per_word, pack_codes, unpack_codes

__all__ = ["codes_per_word", "pack_codes", "unpack_codes"]
