"""Shipping a chosen candidate (issue 18): a quantized checkpoint (`export_quantized`, `read_quantized`), a runtime
that generates from it without the search (`QuantizedModel`, modes 'dequant' and 'int'), and a diffusers folder of
its dequantized weights (`export_diffusers`). Lower layer: imports quant, diffusion and models, never search."""

from tmpq_jax.deploy.diffusers_format import export_diffusers
from tmpq_jax.deploy.packing import codes_per_word, pack_codes, unpack_codes
from tmpq_jax.deploy.quantized import (CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE, FormatError,
                                       QuantizedCheckpoint, export_quantized, read_quantized)
from tmpq_jax.deploy.runtime import MODES, QuantizedModel

__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "MODES", "WEIGHTS_FILE", "FormatError", "QuantizedCheckpoint",
           "QuantizedModel", "codes_per_word", "export_diffusers", "export_quantized", "pack_codes",
           "read_quantized", "unpack_codes"]
