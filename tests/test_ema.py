"""The parameters' moving average (`train.ema_decay`): the update against a NumPy loop, and that
validation, evaluation and serving use it."""

import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config

from fdh_jax import parallel
from fdh_jax.data import load_split
from fdh_jax.data.pipeline import iterate, train_dataset
from fdh_jax.evaluation.evaluate import evaluate
from fdh_jax.models.fdh import build_model
from fdh_jax.serving.workdir_encoder import restore_encoder
from fdh_jax.training import checkpointing, selection, train
from fdh_jax.training.optimizer import make_optimizer, update_ema
from fdh_jax.training.step import create_train_state, make_train_step, state_variables


def _numpy_leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


def test_moving_average_follows_a_numpy_loop_and_keeps_still_leaves_exact():
    decay, num_steps = 0.6, 5
    config = tiny_config(num_steps)
    config.train.ema_decay = decay
    source = load_split(config, "train")
    model = build_model(config, source.num_classes)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = create_train_state(config, model, make_optimizer(config, num_steps), mesh)
    initial = _numpy_leaves(state.params)
    for a, b in zip(initial, _numpy_leaves(state.ema_params), strict=True):
        np.testing.assert_array_equal(a, b)  # the average starts at the initial parameters

    step_fn = make_train_step(config, mesh, num_steps, donate=False)
    batches = iterate(train_dataset(source, config, num_steps))
    expected = initial
    for t in range(1, num_steps + 1):
        state, _ = step_fn(state, parallel.global_batch(next(batches), mesh))
        rate = min(decay, (1 + t) / (10 + t))  # hand-written: 2/11, 3/12, 4/13, 5/14, 0.6
        params = _numpy_leaves(state.params)
        expected = [rate * e + (1 - rate) * p for e, p in zip(expected, params, strict=True)]
    averaged = _numpy_leaves(state.ema_params)
    for got, want in zip(averaged, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    moved = [not np.allclose(a, p) for a, p in zip(averaged, params, strict=True)]
    assert sum(moved) > len(moved) // 2  # the average is not the parameters

    # A leaf that never changes keeps its exact value (a frozen backbone's weights).
    still = {"w": jax.numpy.full((3,), 0.1, jax.numpy.float32)}
    out = update_ema(still, still, 0.999, jax.numpy.asarray(7))
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(still["w"]))


def test_without_a_moving_average_the_state_tree_is_unchanged():
    config = tiny_config(1)
    model = build_model(config, 4)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = create_train_state(config, model, make_optimizer(config, 1), mesh)
    assert state.ema_params is None  # old checkpoints (no such field) restore as before
    variables = state_variables(state)
    assert variables["params"] is state.params


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ema")
    config = tiny_config(num_steps=6)
    config.train.ema_decay = 0.7
    config.eval.validation_fraction = 0.34
    config.eval.every = 3
    config.eval.select = "best"
    return config, workdir, train.train_and_evaluate(config, workdir)


def _restored_state(config, workdir, step):
    source = load_split(config, "train")
    model = build_model(config, source.num_classes)
    mesh = parallel.make_mesh(jax.devices()[:1])
    template = create_train_state(
        config, model, make_optimizer(config, config.train.num_steps), mesh
    )
    manager = checkpointing.checkpoint_manager(workdir, config)
    try:
        state, _ = checkpointing.restore_checkpoint(manager, template, step)
    finally:
        manager.close()
    return model, mesh, state


def test_validation_evaluation_and_serving_use_the_moving_average(averaged_run):
    config, workdir, results = averaged_run
    step = results["steps"]
    model, mesh, state = _restored_state(config, workdir, step)
    assert state.ema_params is not None

    # Serving restores the average, not the raw parameters.
    encoder = restore_encoder(workdir)
    assert encoder.step == step
    served = _numpy_leaves(encoder.variables["params"])
    for got, want in zip(served, _numpy_leaves(state.ema_params), strict=True):
        np.testing.assert_array_equal(got, want)
    assert any(
        not np.array_equal(a, b) for a, b in zip(served, _numpy_leaves(state.params), strict=True)
    )

    # The selected step's validation score is that of the average's codes.
    _, validation = selection.validation_sources(config, load_split(config, "train"))
    scores = selection.validation_scores(model, state, validation, config, mesh)
    assert scores == pytest.approx(results["selected"]["validation_mAP"], abs=1e-6)

    # The reported query mAP is that of the average's codes.
    query, database = load_split(config, "test"), load_split(config, "train")
    averaged = {"params": state.ema_params, "batch_stats": state.batch_stats}
    scored = evaluate(model, averaged, query, database, config, mesh)
    assert scored.results["mAP"] == pytest.approx(results["mAP"], abs=1e-6)


def test_resume_continues_the_moving_average_exactly(averaged_run, tmp_path):
    config, _, _ = averaged_run
    config = config.copy_and_resolve_references()
    config.eval.validation_fraction, config.eval.every, config.eval.select = 0.0, 0, "last"
    config.train.keep_checkpoints = 3
    reference = train.train_and_evaluate(config, tmp_path / "whole")
    _, _, whole = _restored_state(config, tmp_path / "whole", 6)

    resumed_dir = tmp_path / "resumed"
    train.train_and_evaluate(config, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "6")  # as if killed after step 4's save
    (resumed_dir / "results.json").unlink()
    resumed = train.train_and_evaluate(config, resumed_dir)
    _, _, state = _restored_state(config, resumed_dir, 6)
    for got, want in zip(
        _numpy_leaves(state.ema_params), _numpy_leaves(whole.ema_params), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    assert resumed["mAP"] == reference["mAP"]
