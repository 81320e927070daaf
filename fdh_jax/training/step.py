"""The train state and the jitted train step.

`TrainState` holds parameters, optimiser state, step, BatchNorm statistics and (with
`train.ema_decay > 0`) the parameters' moving average. `make_train_step` jits `train_step` over
the `('data',)` mesh: state replicated, batch sharded, one update per global batch.
"""

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from fdh_jax import parallel
from fdh_jax.data.pipeline import model_inputs
from fdh_jax.models import pretrained
from fdh_jax.models.backbones import get_backbone
from fdh_jax.training.losses import total_loss
from fdh_jax.training.optimizer import learning_rate_schedule, update_count, update_ema


class TrainState(train_state.TrainState):
    """Parameters, optimiser state and step, plus BatchNorm statistics and, with
    `train.ema_decay > 0`, the exponential moving average of the parameters (None otherwise, so
    that the checkpoint tree of a run without it is unchanged)."""

    batch_stats: Any
    ema_params: Any = None


def state_variables(state: Any) -> dict:
    """The variables of a train state that validation, evaluation and serving use: the moving
    average of the parameters when the run keeps one (`train.ema_decay > 0`), else the
    parameters; with the BatchNorm statistics."""
    params = state.params if getattr(state, "ema_params", None) is None else state.ema_params
    return {"params": params, "batch_stats": state.batch_stats}


def create_train_state(
    config: ml_collections.ConfigDict,
    model,
    tx: optax.GradientTransformation,
    mesh,
    calibration_images: np.ndarray | None = None,
    load_pretrained: bool = True,
) -> TrainState:
    """Initialises the replicated train state from `config.seed` (jitted: created on device).

    With `config.model.pretrained` (and `load_pretrained`: a run about to restore a checkpoint
    skips it), the backbone's variables are replaced by the weights file's.
    A MobileNetV2 from TFLite has BatchNorm folded into its convs; when it is trained, its norms
    get real statistics from `calibration_images` (`[N, S, S, 3]`, normalised) first, so that
    fine-tuning starts from the pretrained function.
    """
    size = config.data.image_size

    def init() -> TrainState:
        variables = model.init(
            jax.random.key(config.seed), jnp.zeros((1, size, size, 3)), train=False
        )
        return TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            tx=tx,
            batch_stats=variables.get("batch_stats", {}),
        )

    state = jax.jit(init, out_shardings=parallel.replicated(mesh))()
    if config.model.pretrained and load_pretrained:
        state = _with_pretrained_backbone(config, state, tx, calibration_images)
        state = jax.device_put(state, parallel.replicated(mesh))
    if config.train.ema_decay > 0:  # the average starts at the initial parameters (a copy)
        state = state.replace(ema_params=jax.tree.map(jnp.copy, state.params))
    return state


def _with_pretrained_backbone(config, state: TrainState, tx, calibration_images) -> TrainState:
    model = config.model
    backbone = get_backbone(model.backbone, width=model.width)
    size = config.data.image_size
    template = jax.eval_shape(
        partial(backbone.init, train=False), jax.random.key(0), jnp.zeros((1, size, size, 3))
    )
    weights = pretrained.load_pretrained(model.backbone, model.pretrained, template)
    if model.backbone == "mobilenet_v2" and not model.freeze_backbone:
        if calibration_images is None:
            raise ValueError("a trainable TFLite MobileNetV2 needs calibration images")
        weights = pretrained.calibrate_folded_batch_norm(backbone, weights, calibration_images)
    variables = pretrained.graft_backbone(
        {"params": state.params, "batch_stats": state.batch_stats}, weights
    )
    params = jax.tree.map(jnp.asarray, variables["params"])
    return state.replace(
        params=params,
        batch_stats=jax.tree.map(jnp.asarray, variables["batch_stats"]),
        opt_state=tx.init(params),
    )


def _gradients(state: TrainState, batch_stats, batch: dict, loss_config):
    """Loss, its parts, updated BatchNorm statistics and parameter gradients on one batch.

    With `model.dtype="bfloat16"` the model computes in bfloat16 but returns float32 outputs, so
    the losses and gradients here are float32 (parameters are float32 throughout).
    """

    def loss_fn(params):
        outputs, mutated = state.apply_fn(
            {"params": params, "batch_stats": batch_stats},
            model_inputs(batch),
            train=True,
            mutable=["batch_stats"],
        )
        loss, parts = total_loss(outputs, batch["label"], loss_config)
        return loss, (parts, mutated["batch_stats"])

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, parts, batch_stats, grads


def train_step(
    state: TrainState,
    batch: dict,
    loss_config: ml_collections.ConfigDict,
    grad_accum_steps: int = 1,
    micro_batch_sharding: jax.sharding.NamedSharding | None = None,
    schedule: optax.Schedule | None = None,
    ema_decay: float = 0.0,
):
    """One update on a global batch; returns `(new_state, measurements)`.

    Use `make_train_step`, which jits this over the mesh as training does; `schedule` (the head's
    learning-rate schedule) adds the rate this update used to the measurements (`"lr"`). When
    the state keeps a moving average of the parameters, it moves towards the updated ones at
    `ema_rate(ema_decay, new step)`.

    `batch`: `{"image": [B, S, S, 3], "label": [B]}`. With `grad_accum_steps = A > 1` the batch
    is split into `A` contiguous micro-batches of `B / A` (whole classes: the sampler groups a
    batch by class), and the update uses the mean of their gradients. Each micro-batch is
    normalised by its own BatchNorm statistics and the running averages are updated once per
    micro-batch, in order; losses that mix examples (batch-hard triplet, bit balance) see one
    micro-batch. `micro_batch_sharding` (`parallel.micro_batch_sharding`) spreads every
    micro-batch over all devices, so micro-batches do not depend on the device count.
    """
    if grad_accum_steps == 1:
        loss, parts, batch_stats, grads = _gradients(state, state.batch_stats, batch, loss_config)
    else:
        micro = {
            k: v.reshape(grad_accum_steps, v.shape[0] // grad_accum_steps, *v.shape[1:])
            for k, v in batch.items()
        }
        if micro_batch_sharding is not None:
            micro = {
                k: jax.lax.with_sharding_constraint(v, micro_batch_sharding)
                for k, v in micro.items()
            }

        def accumulate(carry, micro_batch):
            grad_sum, batch_stats = carry
            loss, parts, batch_stats, grads = _gradients(
                state, batch_stats, micro_batch, loss_config
            )
            return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats), (loss, parts)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grad_sum, batch_stats), (losses, parts) = jax.lax.scan(
            accumulate, (zeros, state.batch_stats), micro
        )
        grads = jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)
        loss, parts = jnp.mean(losses), jax.tree.map(jnp.mean, parts)

    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if state.ema_params is not None:
        new_state = new_state.replace(
            ema_params=update_ema(state.ema_params, new_state.params, ema_decay, new_state.step)
        )
    measurements = {
        "loss": loss,
        **parts,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(new_state.params),
    }
    if schedule is not None:
        measurements["lr"] = schedule(update_count(state.opt_state))
    return new_state, measurements


def make_train_step(config: ml_collections.ConfigDict, mesh, total_steps: int, donate: bool = True):
    """The train step as training runs it: `train_step` jitted over `mesh` (state replicated,
    batch sharded along `data`, micro-batches of `train.grad_accum_steps` spread over all
    devices, the state's buffers donated unless `donate=False`). `total_steps` fixes the logged
    learning rate's schedule. -> `fn(state, global_batch) -> (state, measurements)`; build the
    global batch with `parallel.global_batch`."""
    return jax.jit(
        partial(
            train_step,
            loss_config=config.loss,
            grad_accum_steps=config.train.grad_accum_steps,
            micro_batch_sharding=parallel.micro_batch_sharding(mesh),
            schedule=learning_rate_schedule(config, total_steps),
            ema_decay=float(config.train.ema_decay),
        ),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=0 if donate else (),
    )
