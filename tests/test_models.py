import pytest

from tmpq_jax import models, quant


@pytest.mark.parametrize("name,lo,hi", [("mnist-small", 1.0e6, 2.0e6), ("cifar-ddpm", 35e6, 45e6),
                                        ("sd-1.x", 859e6, 860e6), ("ddpm-cifar10-32", 35.7e6, 35.8e6)])
def test_param_counts_from_eval_shape(name, lo, hi):
    shapes = models.param_shapes(name)
    shapes = shapes.get("unet", shapes)  # SD: the UNet (859.52M in diffusers), not the VAE decoder or prompt rows
    assert lo <= models.count_params(shapes) <= hi


def test_mnist_small_has_attention_sites():
    spec = models.get_spec("mnist-small")
    m = models.build_model(spec)
    sites = quant.discover_sites(lambda p, *a: m.apply({"params": p}, *a), models.param_shapes(spec),
                                 models.example_inputs(spec))
    kinds = {s.kind for s in sites.sites}
    assert kinds == {"conv", "dense", "matmul"}
    assert sum(s.path.endswith("/qk") for s in sites.sites) >= 2


def test_unknown_model_name():
    with pytest.raises(ValueError, match="mnist-small"):
        models.get_spec("mnist-huge")
