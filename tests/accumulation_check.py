"""Gradient accumulation on a 4-device mesh against independent references; prints JSON.

Run in a fresh process with `XLA_FLAGS=--xla_force_host_platform_device_count=4`
(tests/test_accumulation.py does). Not a test module itself: the flag must be set before JAX starts.

- `accumulated`: one `train_step` with `grad_accum_steps=4` on 4 devices, against a 1-device loop
  over the 4 contiguous micro-batches (each normalised by its own BatchNorm statistics, running
  averages threaded through in order) and one optimiser update with the mean gradient.
- `tiled`: a batch made of 4 copies of one micro-batch, where accumulation must equal the plain
  step on the whole batch (BatchNorm statistics, batch-hard mining and bit balance of 4 copies are
  those of one): loss, gradient norm and updated parameters. Running averages are not compared:
  4 updates with decay 0.9 are not 1.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_config  # noqa: E402

from fdh_jax import parallel  # noqa: E402
from fdh_jax.data import load_split  # noqa: E402
from fdh_jax.data.transforms import eval_transform  # noqa: E402
from fdh_jax.models.fdh import build_model  # noqa: E402
from fdh_jax.training.losses import total_loss
from fdh_jax.training.optimizer import make_optimizer
from fdh_jax.training.step import create_train_state, make_train_step

ACCUM = 4


def excess(a, b, rtol=1e-4, atol=1e-6) -> float:
    """Largest excess over an allclose(rtol, atol) bound, over all leaves; <= 0: all close."""
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)) - rtol * np.abs(np.asarray(y)) - atol))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def micro_batches(config, source):
    """16 images: micro-batch i holds classes i and i + 1 (mod 4), two images of each."""
    members = [np.flatnonzero(np.asarray(source.labels) == c) for c in range(4)]
    index = [
        members[c][(2 * i + j) % len(members[c])]
        for i in range(ACCUM)
        for c in (i % 4, (i + 1) % 4)
        for j in range(2)
    ]
    data = config.data
    images = np.stack(
        [eval_transform(source[i]["image"], data.image_size, data.eval_resize) for i in index]
    )
    return {"image": images, "label": np.asarray(source.labels, np.int32)[index]}


def jitted_step(config, mesh, accum):
    """The product's train step over `mesh` with `accum` micro-batches (state not donated: the
    checks compare it afterwards); `fn(state, host_batch) -> (state, measurements)`."""
    config = config.copy_and_resolve_references()
    config.train.grad_accum_steps = accum
    fn = make_train_step(config, mesh, total_steps=1, donate=False)
    return lambda state, batch: fn(state, parallel.global_batch(batch, mesh))


def reference(config, model, state, batch):
    """The 1-device loop over micro-batches, then one update with the mean gradient."""

    @jax.jit
    def gradients(params, batch_stats, images, labels):
        def loss_fn(p):
            outputs, mutated = model.apply(
                {"params": p, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            return total_loss(outputs, labels, config.loss)[0], mutated["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, batch_stats, grads

    size = len(batch["label"]) // ACCUM
    batch_stats, grad_sum, losses = state.batch_stats, None, []
    for i in range(ACCUM):
        part = slice(i * size, (i + 1) * size)
        loss, batch_stats, grads = gradients(
            state.params, batch_stats, batch["image"][part], batch["label"][part]
        )
        losses.append(float(loss))
        grad_sum = grads if grad_sum is None else jax.tree.map(jnp.add, grad_sum, grads)
    mean = jax.tree.map(lambda g: g / ACCUM, grad_sum)
    return state.apply_gradients(grads=mean, batch_stats=batch_stats), float(np.mean(losses))


if __name__ == "__main__":
    devices = jax.devices()
    assert len(devices) == 4, f"expected 4 fake CPU devices, got {len(devices)}"
    config = tiny_config(1)
    config.train.optimizer = "sgd"  # linear in the gradient: tight parameter comparisons
    source = load_split(config, "train")
    model = build_model(config, source.num_classes)
    tx = make_optimizer(config, 1)
    mesh, mesh_1 = parallel.make_mesh(devices), parallel.make_mesh(devices[:1])
    batch = micro_batches(config, source)

    state = create_train_state(config, model, tx, mesh)
    accumulated_step = jitted_step(config, mesh, ACCUM)  # one compile for both batches
    accumulated, measured = accumulated_step(state, batch)
    expected, expected_loss = reference(
        config, model, create_train_state(config, model, tx, mesh_1), batch
    )

    size = len(batch["label"]) // ACCUM
    tiled = {k: np.concatenate([v[:size]] * ACCUM) for k, v in batch.items()}
    tiled_accumulated, tiled_measured = accumulated_step(state, tiled)
    whole, whole_measured = jitted_step(config, mesh, 1)(state, tiled)
    print(
        json.dumps(
            {
                "accumulated": {
                    "loss": float(measured["loss"]),
                    "expected_loss": expected_loss,
                    "param_excess": excess(accumulated.params, expected.params),
                    "batch_stats_excess": excess(accumulated.batch_stats, expected.batch_stats),
                    "param_change": float(
                        max(
                            np.max(np.abs(np.asarray(a) - np.asarray(b)))
                            for a, b in zip(
                                jax.tree.leaves(accumulated.params),
                                jax.tree.leaves(state.params),
                                strict=True,
                            )
                        )
                    ),
                },
                "tiled": {
                    "loss": float(tiled_measured["loss"]),
                    "whole_loss": float(whole_measured["loss"]),
                    "grad_norm": float(tiled_measured["grad_norm"]),
                    "whole_grad_norm": float(whole_measured["grad_norm"]),
                    "param_excess": excess(tiled_accumulated.params, whole.params),
                },
            }
        )
    )
