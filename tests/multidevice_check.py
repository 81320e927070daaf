"""Runs a few FDH-MFE train steps on a 4-device mesh and on 1 device; prints JSON.

Run in a fresh process with `XLA_FLAGS=--xla_force_host_platform_device_count=4`
(tests/test_parallel.py does). Not a test module itself: the flag must be set before JAX starts.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_config  # noqa: E402

from fdh_jax import parallel  # noqa: E402
from fdh_jax.data import load_split  # noqa: E402
from fdh_jax.data.pipeline import iterate, train_dataset  # noqa: E402
from fdh_jax.models.fdh import build_model  # noqa: E402
from fdh_jax.training.optimizer import make_optimizer
from fdh_jax.training.step import create_train_state, make_train_step


def run(devices, num_steps=3):
    config = tiny_config(num_steps)
    # SGD: the update is linear in the gradient, so parameters can be compared tightly. (Adam
    # divides by sqrt(v): on near-zero gradients it amplifies float summation-order noise.)
    config.train.optimizer = "sgd"
    mesh = parallel.make_mesh(devices)
    source = load_split(config, "train")
    model = build_model(config, source.num_classes)
    state = create_train_state(config, model, make_optimizer(config, num_steps), mesh)
    step_fn = make_train_step(config, mesh, num_steps)
    losses = []
    for batch in iterate(train_dataset(source, config, num_steps)):
        state, measurements = step_fn(state, parallel.global_batch(batch, mesh))
        losses.append(float(measurements["loss"]))
    leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    return losses, leaves, len(batch["image"]) // len(devices)


if __name__ == "__main__":
    devices = jax.devices()
    assert len(devices) == 4, f"expected 4 fake CPU devices, got {len(devices)}"
    many_losses, many_params, per_device = run(devices)
    one_losses, one_params, _ = run(devices[:1])
    # Largest excess over an allclose(rtol=1e-4, atol=1e-6) bound; <= 0 means every leaf is close.
    param_error = max(
        float(np.max(np.abs(a - b) - 1e-4 * np.abs(b) - 1e-6))
        for a, b in zip(many_params, one_params, strict=True)
    )
    print(
        json.dumps(
            {
                "devices": len(devices),
                "per_device_batch": per_device,
                "losses_4": many_losses,
                "losses_1": one_losses,
                "param_allclose_excess": param_error,
            }
        )
    )
