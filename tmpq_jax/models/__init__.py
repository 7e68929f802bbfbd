"""Model zoo: named diffusers Flax UNet configurations and the project's MNIST classifier."""

from tmpq_jax.models.unet import (MODEL_SPECS, ConditionalUNet, ModelSpec, build_model, count_params,
                                  example_inputs, get_spec, init_params, param_shapes)

__all__ = ["MODEL_SPECS", "ConditionalUNet", "ModelSpec", "build_model", "count_params", "example_inputs",
           "get_spec", "init_params", "param_shapes"]
