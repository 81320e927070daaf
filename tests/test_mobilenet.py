"""MobileNetV2's depthwise conv: the shifted-sum form equals XLA's grouped convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from tiny_models import moved

from fdh_jax.models.mobilenet import DepthwiseConv, MobileNetV2, depthwise_conv_shifted


def grouped_conv(x, kernel, stride):
    return lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
        precision=lax.Precision.HIGHEST,
    )


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 7), (8, 6), (1, 2)])
def test_shifted_depthwise_conv_matches_grouped_conv_and_its_gradients(size, stride):
    rng = np.random.default_rng(size[0] * 10 + stride)
    x = jnp.asarray(rng.normal(size=(2, *size, 5)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 5)).astype(np.float32))
    expected = grouped_conv(x, kernel, stride)
    actual = depthwise_conv_shifted(x, kernel, stride)
    assert actual.shape == expected.shape == (2, -(-size[0] // stride), -(-size[1] // stride), 5)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)

    weights = jnp.asarray(rng.normal(size=expected.shape).astype(np.float32))
    grads = [
        jax.grad(lambda x, k, f=f: jnp.sum(f(x, k, stride) * weights), argnums=(0, 1))(x, kernel)
        for f in (grouped_conv, depthwise_conv_shifted)
    ]
    for expected_grad, actual_grad in zip(*grads, strict=True):
        np.testing.assert_allclose(actual_grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_depthwise_module_has_the_grouped_conv_variables():
    """Same variable name, shape and initial value as `nn.Conv(feature_group_count=C)`."""
    x = jnp.ones((1, 6, 6, 4))
    ours = DepthwiseConv(4, 2).init(jax.random.key(3), x)
    reference = nn.Conv(
        4,
        (3, 3),
        strides=(2, 2),
        padding="SAME",
        feature_group_count=4,
        use_bias=False,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
    ).init(jax.random.key(3), x)
    np.testing.assert_array_equal(ours["params"]["kernel"], reference["params"]["kernel"])
    np.testing.assert_allclose(
        DepthwiseConv(4, 2).apply(ours, x),
        grouped_conv(x, ours["params"]["kernel"], 2),
        rtol=1e-5,
        atol=1e-5,
    )


def test_eval_mode_with_folded_batch_norm_matches_the_layers():
    """Eval mode folds each BatchNorm into its conv and runs the 1x1 convs as matrix products;
    the module's own layers (`fold_batch_norm=False`) are the reference, with statistics and
    affine parameters away from their initial values so that every fold does something."""
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    model = MobileNetV2(num_classes=7)
    variables = moved(jax.jit(model.init)(jax.random.key(1), images), seed=2)
    folded = jax.jit(model.apply)(variables, images)
    layers = jax.jit(MobileNetV2(num_classes=7, fold_batch_norm=False).apply)(variables, images)
    assert set(folded) == set(layers) == {"C2", "C3", "C4", "C5", "logits"}
    for name, expected in layers.items():
        assert float(jnp.std(expected)) > 1e-3, name  # not saturated: the check means something
        np.testing.assert_allclose(
            folded[name],
            expected,
            rtol=2e-4,
            atol=2e-4 * float(jnp.max(jnp.abs(expected))),
            err_msg=name,
        )
