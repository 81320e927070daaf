"""A frozen MobileNetV2 whose last layers train (`model.trainable_after`): the layers run from a
stage equal the whole network, only they move, the feature cache stores what they start from and
keeps its key as they train, and a trained workdir encodes images as training evaluated them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config
from frozen_backbone import entries, frozen_config
from tiny_models import moved

from fdh_jax import parallel
from fdh_jax.config_checks import ConfigError, validate_config
from fdh_jax.data import load_splits
from fdh_jax.models.fdh import FDHMFE, precomputed_stages
from fdh_jax.models.mobilenet import MobileNetV2, layers_after, stages_after
from fdh_jax.serving.workdir_encoder import restore_encoder
from fdh_jax.training import feature_cache
from fdh_jax.training.optimizer import make_optimizer
from fdh_jax.training.train import train_and_evaluate


@pytest.fixture(scope="module")
def mobilenet():
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = moved(jax.jit(MobileNetV2().init)(jax.random.key(1), images))
    return images, variables


def test_stage_names():
    assert layers_after("C4") == (
        "expanded_conv_14",
        "expanded_conv_15",
        "expanded_conv_16",
        "expanded_conv_17",
        "conv_18",
        "conv_18_bn",
    )
    assert stages_after("C3") == ("C4", "C5")
    assert precomputed_stages(("C3", "C4", "C5"), "C4") == ("C3", "C4")
    assert precomputed_stages(("C3", "C4", "C5"), "C3") == ("C3",)
    assert precomputed_stages(("C4", "C5")) == ("C4", "C5")
    with pytest.raises(ValueError, match="C2, C3, C4"):
        layers_after("C5")


@pytest.mark.parametrize("start", ["C2", "C4"])
@pytest.mark.parametrize("fold", [True, False])
def test_layers_from_a_stage_equal_the_whole_network(mobilenet, start, fold):
    images, variables = mobilenet
    model = MobileNetV2(fold_batch_norm=fold)
    whole = jax.jit(model.apply)(variables, images)
    tail = jax.jit(lambda v, x: model.apply(v, x, start=start))(variables, whole[start])
    assert set(tail) == set(stages_after(start))
    for name, value in tail.items():
        assert float(jnp.std(whole[name])) > 1e-3, name
        np.testing.assert_allclose(value, whole[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_folded_layers_have_the_gradients_of_the_layers(mobilenet):
    """Training runs the folded form (BatchNorm statistics kept); its gradients with respect to
    every variable after the stage are those of the module's own layers in eval mode."""
    images, variables = mobilenet
    c4 = MobileNetV2().apply(variables, images)["C4"]

    def loss(params, fold):
        model = MobileNetV2(fold_batch_norm=fold)
        out = model.apply({**variables, "params": params}, c4, start="C4")
        return jnp.sum(jnp.sin(out["C5"]))

    folded = jax.jit(jax.grad(lambda p: loss(p, True)))(variables["params"])
    layers = jax.jit(jax.grad(lambda p: loss(p, False)))(variables["params"])
    for layer in layers_after("C4"):
        for (path, value), expected in zip(
            jax.tree_util.tree_leaves_with_path(folded[layer]),
            jax.tree.leaves(layers[layer]),
            strict=True,
        ):
            assert float(jnp.max(jnp.abs(expected))) > 0, (layer, path)
            scale = float(jnp.max(jnp.abs(expected)))
            np.testing.assert_allclose(value, expected, atol=1e-4 * scale, err_msg=str(path))
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(folded["expanded_conv_13"]))


def tiny_fdh(**overrides) -> FDHMFE:
    fields = dict(
        num_classes=4,
        bits=(8,),
        backbone="mobilenet_v2",
        node_dim=16,
        gnn_heads=2,
        gnn_layers=1,
        freeze_backbone=True,
        trainable_after="C4",
    )
    return FDHMFE(**(fields | overrides))


def test_precomputed_maps_give_the_codes_of_images_and_only_the_last_layers_learn():
    model = tiny_fdh()
    images = jax.random.normal(jax.random.key(3), (8, 64, 64, 3))
    variables = moved(jax.jit(lambda: model.init(jax.random.key(4), images[:1], train=False))())
    maps = MobileNetV2().apply(
        {k: v["backbone"] for k, v in variables.items()}, images, train=False
    )
    stored = {name: maps[name] for name in precomputed_stages(model.stages, "C4")}
    from_images = jax.jit(model.apply)(variables, images)
    from_maps = jax.jit(model.apply)(variables, stored)
    np.testing.assert_allclose(from_maps["hash"]["8"], from_images["hash"]["8"], atol=1e-5)
    np.testing.assert_allclose(from_maps["pooled"], from_images["pooled"], rtol=1e-5, atol=1e-5)

    labels = jnp.arange(8) % 4

    def loss(params, inputs):
        out, _ = model.apply(
            {**variables, "params": params}, inputs, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(out["class_logits"], labels).mean()

    gradients = jax.jit(jax.grad(loss))  # one compiled function per input structure
    for inputs in (stored, images):  # the cached path and the path from images
        grads = gradients(variables["params"], inputs)["backbone"]
        for layer, tree in grads.items():
            largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(tree))
            assert (largest > 0) == (layer in layers_after("C4")), layer

    config = load_config("folder")
    config.model.backbone, config.model.freeze_backbone = "mobilenet_v2", True
    config.model.trainable_after = "C4"
    config.train.warmup_steps = 0  # the first update at the full rate
    tx = make_optimizer(config, total_steps=10)
    params = variables["params"]
    grads = gradients(params, stored)
    updates, _ = tx.update(grads, tx.init(params), params)
    for layer, tree in updates["backbone"].items():
        moves = any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(tree))
        assert moves == (layer in layers_after("C4")), layer
    assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(updates["mfe"]))


def test_precomputed_maps_without_the_starting_stage_are_refused():
    """Maps for the frozen model (C3, C5) lack C4, where the trainable layers start."""
    maps = {"C3": jnp.zeros((1, 8, 8, 32)), "C5": jnp.zeros((1, 2, 2, 1280))}
    with pytest.raises(ValueError, match="lack C4.*computing those after C4"):
        tiny_fdh().init(jax.random.key(0), maps)


def test_config_checks():
    config = load_config("folder")
    config.data.root = "/data"
    config.model.trainable_after = "C4"
    with pytest.raises(ConfigError, match="model.trainable_after.*mobilenet_v2"):
        validate_config(config, 1)
    config.model.backbone, config.model.freeze_backbone = "mobilenet_v2", True
    validate_config(config, 1)
    config.model.trainable_after = "C5"
    with pytest.raises(ConfigError, match="model.trainable_after"):
        validate_config(config, 1)


def test_run_trains_the_last_layers_on_cached_maps_and_the_workdir_encodes_images_alike(
    dataset, tmp_path
):
    root, cache = dataset
    config = frozen_config(root, cache, 4)
    config.model.backbone = "mobilenet_v2"
    config.model.trainable_after = "C4"
    config.train.backbone_lr_multiplier = 0.5
    workdir = tmp_path / "run"
    results = train_and_evaluate(config, workdir)
    made = entries(cache)
    assert len(made) == 2  # database and query
    for entry in made:
        manifest = json.loads((entry / "manifest.json").read_text())
        assert sorted(manifest["files"]) == ["C3", "C4"]  # C5 is the trained layers' output
    # The finished run evaluates again from the same entries: the key ignores the moved layers.
    again = train_and_evaluate(config, workdir)
    assert entries(cache) == made and again["mAP"] == results["mAP"]

    encoder = restore_encoder(workdir)
    initial = jax.jit(  # the run's initial variables (`create_train_state`)
        lambda: encoder.model.init(
            jax.random.key(config.seed), jnp.zeros((1, 32, 32, 3)), train=False
        )
    )()["params"]["backbone"]
    trained = encoder.variables["params"]["backbone"]
    for layer, tree in initial.items():
        pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(trained[layer]), strict=True)
        same = all(np.array_equal(a, b) for a, b in pairs)
        assert same == (layer not in layers_after("C4")), layer

    # Codes from images (the whole trained backbone, as exports and the service run it) equal the
    # codes from the cached maps that evaluation used, up to the maps' float16 storage; the
    # trained variables find the same cache entry.
    query = load_splits(config, ("test",))["test"]
    backbone_variables = {k: v["backbone"] for k, v in encoder.variables.items()}
    maps = feature_cache.cached_stage_maps(
        config, query, backbone_variables, parallel.make_mesh(), 1, cache
    )
    assert entries(cache) == made
    indices = range(6)
    stored = {k: np.stack([maps[i][k] for i in indices]) for k in ("C3", "C4")}
    images = np.stack(
        [feature_cache.view_image(query[i]["image"], i, 0, config.data) for i in indices]
    )
    from_maps = encoder.model.apply(encoder.variables, stored)["hash"]
    from_images = encoder.model.apply(encoder.variables, jnp.asarray(images))["hash"]
    for k in from_maps:
        np.testing.assert_allclose(from_maps[k], from_images[k], atol=2e-2)
