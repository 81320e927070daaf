"""Validation split and checkpoint selection: held-out images, best-step choice, serving it."""

import json

import numpy as np
import pytest
from conftest import tiny_config

from fdh_jax.data import class_validation_split, load_splits, validation_split
from fdh_jax.serving.load import load_encoder
from fdh_jax.training import selection, train


def test_validation_split_is_per_class_disjoint_and_stable():
    labels = np.repeat(np.arange(5), [1, 2, 10, 7, 20])
    fit, held_out = validation_split(labels, 0.2, seed=3)
    assert np.intersect1d(fit, held_out).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([fit, held_out])), np.arange(labels.size))
    # round(0.2 n) per class, at least one image of each class left for training.
    counts = np.bincount(labels[held_out], minlength=5)
    np.testing.assert_array_equal(counts, [0, 0, 2, 1, 4])
    assert set(labels[fit]) == set(range(5))
    again = validation_split(labels, 0.2, seed=3)
    np.testing.assert_array_equal(again[1], held_out)
    other = validation_split(labels, 0.2, seed=4)[1]
    assert not np.array_equal(other, held_out)
    assert validation_split(labels, 0.0, seed=3)[1].size == 0


def test_validation_images_come_from_the_database_split_only():
    config = tiny_config()
    config.eval.validation_fraction = 0.34
    splits = load_splits(config, ("train", "test"))
    training, (queries, database) = selection.validation_sources(config, splits["train"])
    assert len(queries) == 4 * 2 and len(training) == len(database) == 4 * 4
    assert set(queries.indices).isdisjoint(training.indices)
    assert len(set(queries.indices) | set(training.indices)) == len(splits["train"])
    # Held-out images are database images: none of them is a query image.
    for i in range(len(queries)):
        held = queries[i]["image"]
        assert not any(np.array_equal(held, splits["test"][j]["image"]) for j in range(12))


def test_class_validation_holds_out_whole_classes_half_query_half_database():
    labels = np.repeat(np.arange(10), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    train_part, queries, database = class_validation_split(labels, 0.3, seed=5)
    parts = np.concatenate([train_part, queries, database])
    np.testing.assert_array_equal(np.sort(parts), np.arange(labels.size))  # a partition
    held = set(labels[np.concatenate([queries, database])])
    assert len(held) == 3 and held.isdisjoint(labels[train_part])  # round(0.3 * 10) classes
    assert set(labels[train_part]) == set(range(10)) - held
    for label in held:  # n // 2 of each held-out class query the other n - n // 2
        n = np.sum(labels == label)
        assert np.sum(labels[queries] == label) == n // 2
        assert np.sum(labels[database] == label) == n - n // 2
    again = class_validation_split(labels, 0.3, seed=5)
    for a, b in zip(again, (train_part, queries, database), strict=True):
        np.testing.assert_array_equal(a, b)
    others = [set(labels[class_validation_split(labels, 0.3, seed=s)[1]]) for s in range(6, 12)]
    assert any(other != held for other in others)
    # Never every class: at least one stays for training.
    assert class_validation_split(labels[:3], 0.9, seed=0)[0].size > 0


def test_class_validation_trains_without_the_held_out_classes(tmp_path, monkeypatch, capsys):
    seen = {}
    real_dataset, real_scores = train.train_dataset, selection.validation_scores

    def recording_dataset(source, *args, **kwargs):
        seen["train_labels"] = set(source.labels.tolist())
        return real_dataset(source, *args, **kwargs)

    def recording_scores(model, state, validation, config, mesh):
        seen["validation"] = [set(part.labels.tolist()) for part in validation]
        return real_scores(model, state, validation, config, mesh)

    monkeypatch.setattr(train, "train_dataset", recording_dataset)
    monkeypatch.setattr(selection, "validation_scores", recording_scores)
    config = tiny_config(num_steps=2)
    config.eval.validation_fraction = 0.25  # 1 of the 4 classes
    config.eval.validation_by = "classes"
    config.eval.select = "best"
    results = train.train_and_evaluate(config, tmp_path)

    held = seen["validation"][0]
    assert len(held) == 1 and seen["validation"][1] == held
    assert seen["train_labels"] == {0, 1, 2, 3} - held
    assert results["selected"]["validation_queries"] == 3  # 6 images: 3 query the other 3
    assert results["selected"]["validation_database"] == 3
    assert results["num_database"] == 24  # the protocol's database is still the whole split
    # The start line counts what trains, not the whole database split.
    assert "(18 of 24 images, 3 of 4 classes) for 2 steps" in capsys.readouterr().out


@pytest.mark.parametrize("select", ["best", "last"])
def test_select_best_scores_and_serves_the_best_validation_step(tmp_path, monkeypatch, select):
    curve = {2: 0.30, 4: 0.55, 6: 0.40, 8: 0.50}  # a forced validation curve: best at step 4
    seen = []

    def forced(model, state, validation, config, mesh):
        step = int(state.step)
        seen.append(step)
        return {"8": curve[step], "12": curve[step], "mean": curve[step]}

    monkeypatch.setattr(selection, "validation_scores", forced)
    config = tiny_config(num_steps=8)
    config.train.checkpoint_every = 8
    config.train.keep_checkpoints = 1
    config.eval.validation_fraction = 0.34
    config.eval.every = 2
    config.eval.select = select
    results = train.train_and_evaluate(config, tmp_path)

    assert seen == [2, 4, 6, 8]
    expected = 4 if select == "best" else 8
    assert results["steps"] == expected
    assert results["selected"]["step"] == expected
    assert results["selected"]["validation_mAP"]["mean"] == curve[expected]
    assert results["selected"]["validation_queries"] == 8
    assert json.loads((tmp_path / "results.json").read_text()) == results
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ([4, 8] if select == "best" else [8])
    assert load_encoder(tmp_path).step == expected
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validation_rows = [row for row in logged if "validation/mAP_mean" in row]
    assert [row["step"] for row in validation_rows] == [2, 4, 6, 8]


def test_select_best_without_a_validation_split_is_refused():
    from fdh_jax.config_checks import validate_config

    config = tiny_config()
    config.eval.select = "best"
    with pytest.raises(ValueError, match="eval.validation_fraction"):
        validate_config(config, 1)
    config.eval.validation_fraction = 0.1
    validate_config(config, 1)
    config.eval.select = "newest"
    with pytest.raises(ValueError, match="eval.select"):
        validate_config(config, 1)
    config.eval.validation_by = "species"
    with pytest.raises(ValueError, match="eval.validation_by"):
        validate_config(config, 1)
    config.eval.validation_by = "classes"
    config.eval.select = "best"
    config.eval.validation_fraction = 1.0
    with pytest.raises(ValueError, match="eval.validation_fraction"):
        validate_config(config, 1)


def test_a_validation_fraction_that_holds_out_nothing_names_the_field():
    from fdh_jax.config_checks import ConfigError

    config = tiny_config()
    config.eval.validation_fraction = 0.05  # round(0.05 * 6) = 0 of every class
    source = load_splits(config, ("train",))["train"]
    with pytest.raises(ConfigError, match="eval.validation_fraction.*holds out no image"):
        selection.validation_sources(config, source)
    config.eval.validation_by = "classes"  # round(0.05 * 4) = 0 classes
    with pytest.raises(ConfigError, match="eval.validation_fraction.*holds out no class"):
        selection.validation_sources(config, source)


def test_frozen_mobilenet_v2_recipe_selects_on_validation_only():
    from conftest import load_config

    config = load_config("frozen_mobilenet_v2")
    assert config.data.name == "folder" and config.model.backbone == "mobilenet_v2"
    assert config.model.freeze_backbone and config.eval.select == "best"
    assert 0 < config.eval.validation_fraction < 1
