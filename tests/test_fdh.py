"""The assembled FDH-MFE module: hash heads on the unit descriptor, precomputed stage maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import random_images, tiny_model

from fdh_jax.models.backbones import get_backbone


def test_hash_heads_read_the_l2_normalised_descriptor():
    model = tiny_model()
    images = random_images()
    variables = model.init(jax.random.key(0), images)
    outputs = model.apply(variables, images)
    z = np.asarray(outputs["descriptor"], np.float64)
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    for k in ("6", "10"):
        head = variables["params"][f"hash_{k}"]
        expected = np.tanh(unit @ np.asarray(head["kernel"]) + np.asarray(head["bias"]))
        np.testing.assert_allclose(outputs["hash"][k], expected, rtol=1e-5, atol=1e-6)


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_pooled_to_heads_feeds_the_unit_pooled_c5_beside_the_descriptor():
    model = tiny_model(pooled_to_heads=True)
    images = random_images()
    variables = model.init(jax.random.key(0), images)
    outputs = model.apply(variables, images)
    head_input = np.concatenate([_unit(outputs["descriptor"]), _unit(outputs["pooled"])], 1)
    for k in ("6", "10"):
        head = variables["params"][f"hash_{k}"]
        expected = np.tanh(head_input @ np.asarray(head["kernel"]) + np.asarray(head["bias"]))
        np.testing.assert_allclose(outputs["hash"][k], expected, rtol=1e-5, atol=1e-6)
    # In training the background codes read C5 pooled over the background, 1 - mask.
    frozen = tiny_model(freeze_backbone=True, pooled_to_heads=True)
    backbone = get_backbone("resnet_narrow", width=8)
    stage_maps = backbone.apply(
        {
            "params": variables["params"]["backbone"],
            "batch_stats": variables["batch_stats"]["backbone"],
        },
        images,
        False,
    )
    trained, state = frozen.apply(
        variables,
        stage_maps,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda module, _: module.name == "mfe",
    )
    ((_, background),) = state["intermediates"]["mfe"]["__call__"]
    weights = 1.0 - np.asarray(trained["mask"], np.float64)
    c5 = np.asarray(stage_maps["C5"], np.float64)
    pooled_background = np.sum(c5 * weights, axis=(1, 2)) / np.sum(weights, axis=(1, 2))
    background_input = np.concatenate([_unit(background), _unit(pooled_background)], 1)
    for k in ("6", "10"):
        head = variables["params"][f"hash_{k}"]
        expected = np.tanh(background_input @ np.asarray(head["kernel"]) + np.asarray(head["bias"]))
        np.testing.assert_allclose(trained["hash_background"][k], expected, rtol=1e-5, atol=1e-6)


def test_precomputed_stage_maps_give_the_same_outputs_and_gradients():
    model = tiny_model(freeze_backbone=True)
    images = random_images(1)
    variables = model.init(jax.random.key(1), images)
    backbone = get_backbone("resnet_narrow", width=8)
    backbone_variables = {
        "params": variables["params"]["backbone"],
        "batch_stats": variables["batch_stats"]["backbone"],
    }
    stage_maps = backbone.apply(backbone_variables, images, False)

    from_images = model.apply(variables, images)
    from_maps = model.apply(variables, stage_maps)
    for path, expected in jax.tree_util.tree_leaves_with_path(from_images):
        actual = dict(jax.tree_util.tree_leaves_with_path(from_maps))[path]
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=str(path))

    def head_loss(params, inputs):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            inputs,
            train=True,
            mutable=["batch_stats"],
        )
        return sum(jnp.sum(h**2) for h in out["hash"].values())

    grads_images = jax.grad(head_loss)(variables["params"], images)
    grads_maps = jax.grad(head_loss)(variables["params"], stage_maps)
    assert not any(np.any(g) for g in jax.tree.leaves(grads_images["backbone"]))
    np.testing.assert_allclose(
        grads_maps["mfe"]["C5_proj"]["kernel"],
        grads_images["mfe"]["C5_proj"]["kernel"],
        rtol=1e-4,
        atol=1e-6,
    )


def test_incomplete_stage_maps_name_what_is_missing():
    model = tiny_model(freeze_backbone=True)
    maps = {"C4": jnp.zeros((1, 4, 4, 16)), "C5": jnp.zeros((1, 2, 2, 32))}
    with pytest.raises(ValueError, match=r"lack C3: the model uses C3, C4, C5 .*got C4, C5"):
        model.init(jax.random.key(0), maps)
