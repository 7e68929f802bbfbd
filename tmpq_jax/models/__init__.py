"""Model zoo: model families (`register_model`), named specs, local diffusers folders (`from_pretrained`), and the
project's MNIST classifier."""

from tmpq_jax.models.registry import (FAMILIES, MODEL_SPECS, ModelFamily, ModelSpec, build_model, convert_folder,
                                      count_params, detect_family, example_inputs, folder_digest, from_pretrained,
                                      get_family, get_spec, init_params, param_shapes, read_spec, register_model,
                                      spec_from_dict, spec_to_dict)
from tmpq_jax.models.unet import ConditionalUNet  # registers the 'conditional' family
from tmpq_jax.models import folders, sd  # noqa: E402,F401  register the 'unet2d' and 'sd' families

__all__ = ["FAMILIES", "MODEL_SPECS", "ConditionalUNet", "ModelFamily", "ModelSpec", "build_model", "convert_folder",
           "count_params", "detect_family", "example_inputs", "folder_digest", "from_pretrained", "get_family",
           "get_spec", "init_params", "param_shapes", "read_spec", "register_model", "spec_from_dict", "spec_to_dict"]
