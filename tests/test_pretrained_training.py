"""Training from pretrained weights through `train_and_evaluate` on a folder dataset.

A resnet18 `.safetensors` written here from a PyTorch model (skipped without torch) and the
released TFLite MobileNetV2 (skipped without the shared weights). With a frozen backbone the
trained checkpoint must hold exactly the file's backbone variables while the heads move; a
frozen backbone also gets no gradient at all (no backward pass through it).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TFLITE_PATH
from folder_datasets import (
    IMAGE_SIZE,
    NUM_CLASSES,
    PER_CLASS,
    STEPS,
    pretrained_config,
    resnet18_file,
    write_folder_dataset,
)

from fdh_jax import parallel
from fdh_jax.models.backbones import get_backbone
from fdh_jax.models.fdh import build_model
from fdh_jax.models.pretrained import load_pretrained
from fdh_jax.training.checkpointing import checkpoint_manager, restore_checkpoint
from fdh_jax.training.losses import total_loss
from fdh_jax.training.optimizer import make_optimizer
from fdh_jax.training.step import create_train_state
from fdh_jax.training.train import train_and_evaluate


def file_backbone_variables(backbone: str, weights: Path) -> dict:
    model = get_backbone(backbone)
    template = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))
    )
    return load_pretrained(backbone, str(weights), template)


def train_and_restore(config, workdir: Path):
    """Runs `train_and_evaluate`; returns `(results, initial state, trained state)`."""
    results = train_and_evaluate(config, workdir)
    mesh = parallel.make_mesh()
    model = build_model(config, NUM_CLASSES)
    tx = make_optimizer(config, STEPS)
    images = np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)  # only for calibration
    initial = create_train_state(config, model, tx, mesh, calibration_images=images)
    manager = checkpoint_manager(workdir, config)
    try:
        trained, _ = restore_checkpoint(manager, initial, manager.latest_step())
    finally:
        manager.close()
    return results, initial, trained


def assert_results_written(workdir: Path, results: dict) -> None:
    written = json.loads((workdir / "results.json").read_text())
    assert written == results
    assert results["steps"] == STEPS and results["dataset"] == "folder"
    assert results["num_query"] + results["num_database"] == NUM_CLASSES * PER_CLASS
    assert set(results["mAP"]) == {"8", "12"}
    assert all(0.0 < value <= 1.0 for value in results["mAP"].values())


def assert_trees_equal(actual, expected) -> None:
    actual_leaves = jax.tree_util.tree_leaves_with_path(actual)
    expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
    assert [path for path, _ in actual_leaves] == [path for path, _ in expected_leaves]
    for (path, a), (_, e) in zip(actual_leaves, expected_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=str(path))


def max_change(before, after) -> float:
    return max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )


def _tflite_file() -> Path:
    if not TFLITE_PATH.is_file():
        pytest.skip(f"shared weights absent: {TFLITE_PATH}")
    return TFLITE_PATH


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_frozen_pretrained_backbone_is_the_file_after_training(tmp_path, backbone):
    weights = resnet18_file(tmp_path) if backbone == "resnet18" else _tflite_file()
    root = write_folder_dataset(tmp_path / "data")
    config = pretrained_config(root, backbone, weights, freeze=True)
    results, initial, trained = train_and_restore(config, tmp_path / "run")

    assert_results_written(tmp_path / "run", results)
    expected = file_backbone_variables(backbone, weights)
    assert_trees_equal(trained.params["backbone"], expected["params"])
    assert_trees_equal(trained.batch_stats["backbone"], expected["batch_stats"])
    assert int(trained.step) == STEPS
    heads = {name: tree for name, tree in trained.params.items() if name != "backbone"}
    initial_heads = {name: tree for name, tree in initial.params.items() if name != "backbone"}
    assert max_change(initial_heads, heads) > 1e-4  # the rest of the model did train
    if backbone == "resnet18":  # a workdir with checkpoints needs no weights file any more
        weights.unlink()
        assert train_and_evaluate(config, tmp_path / "run")["mAP"] == results["mAP"]


def loss_gradients(tmp_path: Path, freeze: bool) -> dict:
    """Gradient of the training loss w.r.t. every parameter of a small random-init model."""
    config = pretrained_config(tmp_path, "resnet_narrow", Path(""), freeze=freeze)
    config.model.pretrained, config.model.width = "", 8
    model = build_model(config, NUM_CLASSES)
    images = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
    labels = np.repeat(np.arange(4, dtype=np.int32), 2)
    variables = jax.jit(lambda: model.init(jax.random.key(0), images))()

    def loss_of(params):
        outputs, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return total_loss(outputs, labels, config.loss)[0]

    return jax.jit(jax.grad(loss_of))(variables["params"])


def test_frozen_backbone_gets_no_gradient(tmp_path):
    """`freeze_backbone` stops gradients at the stage maps: no backward pass through it."""
    frozen, trained = loss_gradients(tmp_path, True), loss_gradients(tmp_path, False)
    assert float(global_norm(frozen["backbone"])) == 0.0
    assert float(global_norm(trained["backbone"])) > 0.0
    assert float(global_norm(frozen["mfe"])) > 0.0


def global_norm(tree) -> jnp.ndarray:
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))
