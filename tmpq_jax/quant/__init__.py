"""Traced-bit fake quantization for any Flax Linen model, shared per-bit calibration, BitOPs, population runs.

Sampling with a quantized candidate lives in `tmpq_jax.sampling`; this package does not need the sampler.
"""

from tmpq_jax.quant.calibrate import (QuantTables, calibrate, check_finite_tables, check_range_norm, unclipped_sites, group_batches, group_of, host_group_of, load_tables,
                                      num_group_batches, save_tables, table_bits_for, trajectory_batches)
from tmpq_jax.quant.engine import (STRATEGIES, CandidateQuant, auto_strategy, bitops,
                                   check_candidate_bits, check_candidate_bits_if_concrete, fp_bitops,
                                   gather_candidate, population_fn, quantize_params, quantized_apply)
from tmpq_jax.quant.reconstruction import Block, ReconSettings, find_blocks, reconstruct
from tmpq_jax.quant.fake_quant import check_bit_choices, check_bits, qdq_asymmetric, qdq_symmetric
from tmpq_jax.quant.sites import (DEFAULT_RULES, QuantRule, Site, SiteTable, discover_sites, make_interceptor,
                                  first_last_rules)

__all__ = ["check_finite_tables", "check_range_norm", "unclipped_sites", "Block", "ReconSettings", "find_blocks", "reconstruct", "QuantTables", "calibrate", "group_batches", "group_of", "host_group_of", "num_group_batches",
           "load_tables", "save_tables", "table_bits_for", "trajectory_batches",
           "STRATEGIES", "CandidateQuant", "auto_strategy", "bitops", "check_candidate_bits",
           "check_candidate_bits_if_concrete", "fp_bitops", "gather_candidate", "population_fn", "quantize_params",
           "quantized_apply", "check_bit_choices", "check_bits", "qdq_asymmetric", "qdq_symmetric",
           "DEFAULT_RULES", "QuantRule", "Site", "SiteTable", "discover_sites", "make_interceptor", "first_last_rules"]

