"""The optimiser: warm-up + cosine schedule, SGD-momentum or AdamW with the backbone at its own
rate (or frozen, or frozen up to `model.trainable_after`), and the moving average of the
parameters (`train.ema_decay`)."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fdh_jax.models.mobilenet import layers_after


def ema_rate(decay: float, step: jax.Array) -> jax.Array:
    """The averaging rate after `step` updates: `min(decay, (1 + step) / (10 + step))`, so that
    the first updates are not tied to the random initial head (TensorFlow's
    `ExponentialMovingAverage` with `num_updates`)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params: Any, params: Any, decay: float, step: jax.Array) -> Any:
    """`ema + (1 - rate) * (params - ema)` per leaf (`ema_rate`): a leaf that does not move (a
    frozen backbone) keeps exactly its value."""
    keep = ema_rate(decay, step)
    return jax.tree.map(lambda e, p: e + (1.0 - keep) * (p - e), ema_params, params)


def learning_rate_schedule(
    config: ml_collections.ConfigDict, total_steps: int, multiplier: float = 1.0
) -> optax.Schedule:
    """Linear warm-up from 0 over `train.warmup_steps`, then cosine decay to 0 at `total_steps`,
    peaking at `train.learning_rate * multiplier`. Argument: the optimiser's update count."""
    train = config.train
    warmup = min(train.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        0.0, train.learning_rate * multiplier, warmup, max(total_steps, warmup + 1), 0.0
    )


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """Warm-up + cosine schedule; SGD-momentum or AdamW; the backbone at its own rate or frozen."""
    train = config.train
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)

    def optimizer(multiplier: float) -> optax.GradientTransformation:
        schedule = learning_rate_schedule(config, total_steps, multiplier)
        if train.optimizer == "adamw":
            return optax.adamw(schedule, weight_decay=train.weight_decay, mask=decay_mask)
        return optax.chain(
            optax.add_decayed_weights(train.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=train.momentum),
        )

    model = config.model
    # A frozen backbone's layers get no update, except those after `model.trainable_after`.
    # (Without that option the groups are those of runs made before it: their checkpoints load.)
    trainable = set(layers_after(model.trainable_after)) if model.trainable_after else set()
    transforms = {"backbone": optimizer(train.backbone_lr_multiplier), "head": optimizer(1.0)}
    if model.freeze_backbone and not trainable:
        transforms["backbone"] = optax.set_to_zero()
    elif model.freeze_backbone:
        transforms["frozen"] = optax.set_to_zero()

    def group(name: str, layer: str) -> str:
        if name != "backbone":
            return "head"
        return "frozen" if "frozen" in transforms and layer not in trainable else "backbone"

    def label(params):
        return {
            name: {layer: _labelled(tree, group(name, layer)) for layer, tree in sub.items()}
            for name, sub in params.items()
        }

    tx = optax.multi_transform(transforms, label)
    if train.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(train.grad_clip), tx)
    return tx


def _labelled(tree: Any, group: str) -> Any:
    """`tree` with every leaf replaced by `group` (an optimiser group's name)."""
    return jax.tree.map(lambda _: group, tree)


def update_count(opt_state) -> jax.Array:
    """The count that the next update passes to the head's learning-rate schedule, read from the
    optimiser state (`ScaleByScheduleState`; the head's, which is the last one found)."""
    states = jax.tree.leaves(
        opt_state, is_leaf=lambda node: isinstance(node, optax.ScaleByScheduleState)
    )
    counts = [node.count for node in states if isinstance(node, optax.ScaleByScheduleState)]
    return counts[-1]
