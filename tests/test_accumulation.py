"""Gradient accumulation (4 fake CPU devices), bfloat16 compute, and their config checks."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_fake_devices, tiny_config

from fdh_jax import parallel
from fdh_jax.config_checks import ConfigError, validate_config
from fdh_jax.data import load_split
from fdh_jax.data.pipeline import iterate, train_dataset
from fdh_jax.models.fdh import build_model
from fdh_jax.training.optimizer import make_optimizer
from fdh_jax.training.step import create_train_state, make_train_step


def test_accumulation_on_four_devices_matches_references():
    report = run_on_fake_devices("accumulation_check.py")
    accumulated, tiled = report["accumulated"], report["tiled"]
    # The accumulated step is one update with the mean micro-batch gradient, micro-batch BN.
    assert accumulated["loss"] == pytest.approx(accumulated["expected_loss"], rel=1e-5)
    assert accumulated["param_excess"] <= 0.0
    assert accumulated["batch_stats_excess"] <= 0.0
    assert accumulated["param_change"] > 1e-4  # the update did move the parameters
    # Where micro-batches and the whole batch must agree, they do.
    assert tiled["loss"] == pytest.approx(tiled["whole_loss"], rel=1e-5)
    assert tiled["grad_norm"] == pytest.approx(tiled["whole_grad_norm"], rel=1e-4)
    assert tiled["param_excess"] <= 0.0


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state():
    config = tiny_config(1)
    config.model.dtype = "bfloat16"
    source = load_split(config, "train")
    model = build_model(config, source.num_classes)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = create_train_state(config, model, make_optimizer(config, 1), mesh)
    batch = parallel.global_batch(next(iterate(train_dataset(source, config, 1))), mesh)
    apply = partial(model.apply, train=False, capture_intermediates=True, mutable=["intermediates"])
    outputs, captured = jax.jit(apply)(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"]
    )
    stage_maps = captured["intermediates"]["backbone"]["__call__"][0]
    assert stage_maps and all(x.dtype == jnp.bfloat16 for x in stage_maps.values())
    # The losses see float32: the model casts its outputs back.
    assert all(h.dtype == jnp.float32 for h in outputs["hash"].values())

    config.train.grad_accum_steps = 2
    new_state, measurements = make_train_step(config, mesh, 1, donate=False)(state, batch)
    for tree in (new_state.params, new_state.opt_state, new_state.batch_stats):
        floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert all(v.dtype == jnp.float32 for v in measurements.values())
    assert np.isfinite(float(measurements["loss"]))


@pytest.mark.parametrize(
    ("accum", "devices", "field"),
    [
        (0, 1, "config.train.grad_accum_steps"),
        (4, 4, "config.train.batch_size"),  # 8 images are not 4 micro-batches x 4 devices
        (8, 1, "config.train.grad_accum_steps"),  # 4 classes cannot be split 8 ways
    ],
)
def test_validation_rejects_impossible_accumulation(accum, devices, field):
    config = tiny_config()
    config.train.grad_accum_steps = accum
    with pytest.raises(ConfigError, match=f"^{field}:"):
        validate_config(config, devices)


def test_validation_accepts_whole_class_micro_batches():
    config = tiny_config()
    config.train.grad_accum_steps = 2
    validate_config(config, 2)
