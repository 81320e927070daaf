"""Test-time flip averaging (`model.flip_average`): the model's outputs against two plain
passes by hand, precomputed maps against images, the feature cache's mirrored entry against the
backbone on mirrored crops, and a cached run end to end against the encoder of its workdir."""

import json

import jax
import numpy as np
import pytest
from frozen_backbone import backbone_variables, entries, frozen_config
from tiny_models import random_images, tiny_model

from fdh_jax import parallel
from fdh_jax.data import load_splits
from fdh_jax.data.transforms import eval_transform
from fdh_jax.encoding import continuous_outputs, encode_source, transfer_outputs
from fdh_jax.evaluation.metrics import mean_average_precision
from fdh_jax.models.backbones import get_backbone
from fdh_jax.models.fdh import FDHMFE, binarize
from fdh_jax.serving.export import export_encoder
from fdh_jax.serving.exported_encoder import load_export
from fdh_jax.serving.workdir_encoder import restore_encoder
from fdh_jax.training import feature_cache
from fdh_jax.training.train import train_and_evaluate


def _model(flip: bool) -> FDHMFE:
    return tiny_model(flip_average=flip)


def test_flip_averaged_outputs_are_the_mean_of_the_image_and_its_mirror():
    images = random_images()
    plain, flipped = _model(False), _model(True)
    variables = plain.init(jax.random.key(1), images)
    # The switch adds no variables: a model trained without it can encode with it.
    flip_tree = jax.eval_shape(lambda: flipped.init(jax.random.key(1), images))
    assert jax.tree.structure(flip_tree) == jax.tree.structure(variables)

    own = plain.apply(variables, images)
    mirror = plain.apply(variables, images[:, :, ::-1])
    averaged = flipped.apply(variables, images)
    for k in ("6", "10"):
        expected = (np.asarray(own["hash"][k]) + np.asarray(mirror["hash"][k])) / 2
        np.testing.assert_allclose(averaged["hash"][k], expected, rtol=1e-5, atol=1e-6)
        # Codes binarise the sum of the two continuous codes, not either pass alone.
        summed = np.asarray(own["hash"][k]) + np.asarray(mirror["hash"][k])
        np.testing.assert_array_equal(binarize(averaged["hash"][k]), np.where(summed >= 0, 1, -1))
    for name in ("descriptor", "pooled", "class_logits"):
        expected = (np.asarray(own[name]) + np.asarray(mirror[name])) / 2
        np.testing.assert_allclose(averaged[name], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(averaged["mask"], own["mask"])  # the image's own mask
    assert not np.allclose(own["hash"]["10"], mirror["hash"]["10"])  # the mirror does differ

    # Training ignores the switch: the same outputs, background codes included.
    rngs = {"dropout": jax.random.key(2)}
    train_plain = plain.apply(variables, images, train=True, rngs=rngs, mutable=["batch_stats"])
    train_flip = flipped.apply(variables, images, train=True, rngs=rngs, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, train_plain, train_flip)


def test_precomputed_maps_need_and_use_the_mirror_images_maps():
    images = random_images(3)
    model = _model(True)
    variables = model.init(jax.random.key(4), images)
    backbone = get_backbone("resnet_narrow", width=8)
    backbone_vars = {
        "params": variables["params"]["backbone"],
        "batch_stats": variables["batch_stats"]["backbone"],
    }
    maps = backbone.apply(backbone_vars, images, train=False)
    mirrored = backbone.apply(backbone_vars, images[:, :, ::-1], train=False)
    from_maps = model.apply(variables, dict(maps) | {"mirrored": dict(mirrored)})
    from_images = model.apply(variables, images)
    for k in ("6", "10"):
        np.testing.assert_allclose(
            from_maps["hash"][k], from_images["hash"][k], rtol=1e-5, atol=1e-6
        )
    # Why the image, not the maps, is mirrored: the network after the backbone is invariant to
    # mirroring its stage maps, so that would give the unmirrored codes again.
    mirrored_maps = {k: v[:, :, ::-1] for k, v in maps.items()}
    np.testing.assert_allclose(
        model.apply(variables, dict(maps) | {"mirrored": mirrored_maps})["hash"]["10"],
        _model(False).apply(variables, dict(maps))["hash"]["10"],
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="mirror image's maps under 'mirrored'"):
        model.apply(variables, dict(maps))
    # Without the switch the mirror image's maps are ignored.
    plain = _model(False)
    np.testing.assert_allclose(
        plain.apply(variables, dict(maps) | {"mirrored": dict(mirrored)})["hash"]["10"],
        plain.apply(variables, images)["hash"]["10"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_cache_adds_a_mirrored_evaluation_view_and_keeps_the_training_entry(dataset):  # noqa: F811
    root, cache = dataset
    config = frozen_config(root, cache)
    variables = backbone_variables(config)
    mesh = parallel.make_mesh()
    splits = load_splits(config, ("train", "test"))
    plain = feature_cache.cached_splits(config, splits["train"], splits["test"], variables, mesh)
    before = entries(cache)
    assert len(before) == 2 and "mirrored" not in plain[0][0]

    config.model.flip_average = True
    database, query = feature_cache.cached_splits(
        config, splits["train"], splits["test"], variables, mesh
    )
    after = entries(cache)
    assert len(after) == 4 and set(before) < set(after)  # two mirrored entries added, none redone
    backbone = get_backbone("resnet_narrow", width=8)
    for cached, source in ((database, splits["train"]), (query, splits["test"])):
        for index in (0, len(source) - 1):
            crop = eval_transform(source[index]["image"], 32, 32)[:, ::-1]
            expected = backbone.apply(variables, crop[None], train=False)
            record = cached[index]
            assert set(record["mirrored"]) == {"C3", "C4", "C5"}
            for stage, value in record["mirrored"].items():
                reference = np.asarray(expected[stage][0])
                np.testing.assert_allclose(
                    value, reference, rtol=2e-3, atol=2e-3 * abs(reference).max()
                )
            inputs = cached.model_inputs(record)
            assert set(inputs) == {"C3", "C4", "C5", "mirrored"}
    manifests = [json.loads((e / "manifest.json").read_text()) for e in set(after) - set(before)]
    assert all(m["description"]["mirrored"] and m["description"]["views"] == 1 for m in manifests)
    with pytest.raises(ValueError, match="one view"):
        feature_cache.cached_stage_maps(config, splits["test"], variables, mesh, 2, cache, True)


def test_cached_flip_averaged_run_scores_what_its_workdir_encoder_encodes(dataset, tmp_path):  # noqa: F811
    root, cache = dataset
    config = frozen_config(root, cache, steps=2)
    config.model.flip_average = True
    config.eval.validation_fraction = 0.25
    results = train_and_evaluate(config, tmp_path / "run")
    assert len(entries(cache)) == 4  # database (training views), query, and both mirrored

    # The workdir's encoder works on images and mirrors them itself (no cache involved).
    encoder = restore_encoder(tmp_path / "run")
    assert encoder.model.flip_average
    splits = load_splits(config, ("train", "test"))
    from_images = encoder.encode_source(splits["train"])
    variables = {
        "params": encoder.variables["params"]["backbone"],
        "batch_stats": encoder.variables["batch_stats"]["backbone"],
    }
    cached, _ = feature_cache.cached_splits(
        config, splits["train"], splits["test"], variables, encoder.mesh
    )
    from_cache, _ = encode_source(encoder.model, encoder.variables, cached, config, encoder.mesh)
    # The real-valued outputs behind those codes (fitted codes and `--adapt` start from them).
    real = continuous_outputs(encoder.model, encoder.variables, cached, config, encoder.mesh)
    pooled, descriptor = transfer_outputs(
        encoder.model, encoder.variables, cached, config, encoder.mesh
    )
    np.testing.assert_array_equal(real["pooled"], pooled)
    np.testing.assert_array_equal(real["descriptor"], descriptor)
    for k in map(str, config.bits):
        np.testing.assert_array_equal(np.where(real[f"hash_{k}"] >= 0, 1, -1), from_cache[k])
    for k in map(str, config.bits):
        # Stage maps are stored as float16: a bit whose code is within rounding of 0 may differ.
        assert np.mean(from_cache[k] == from_images[k]) > 0.97
    # The export's program mirrors too: the same codes from the same images.
    export = load_export(export_encoder(tmp_path / "run", tmp_path / "export"))
    assert export.training_config["model"]["flip_average"] is True
    exported = export.encode_source(splits["train"])
    for k in map(str, config.bits):
        np.testing.assert_array_equal(exported[k], from_images[k])
    query = encoder.encode_source(splits["test"])
    labels = [np.asarray(splits[s].labels) for s in ("test", "train")]
    for k in map(str, config.bits):
        score = mean_average_precision(query[k], from_images[k], *labels)
        assert abs(float(score) - results["mAP"][k]) < 0.05
