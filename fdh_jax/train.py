"""Training: `train_and_evaluate(config, workdir)`.

One linear procedure in banner sections: config check, mesh, data, model, optimiser, checkpoint,
loop, evaluation. The update step is one `jax.jit` over the `('data',)` mesh. Everything that
decides a run's trajectory (parameters, optimiser state, step) is in the checkpoint, and the
batches and augmentation are pure functions of (seed, step), so a run that is killed and
restarted from its workdir, with any number of input workers or threads, ends exactly where an
uninterrupted run would.
"""

import math
import time
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state

from fdh_jax import checkpointing, evaluate, feature_cache, inference, parallel, selection
from fdh_jax.data import load_splits
from fdh_jax.data.pipeline import model_inputs, train_dataset
from fdh_jax.data.transforms import eval_transform
from fdh_jax.losses import total_loss
from fdh_jax.models.backbones import get_backbone
from fdh_jax.models.fdh import build_model
from fdh_jax.summaries import MetricWriter, report
from fdh_jax.validation import validate_config


class TrainState(train_state.TrainState):
    """Parameters, optimiser state and step, plus BatchNorm statistics and, with
    `train.ema_decay > 0`, the exponential moving average of the parameters (None otherwise, so
    that the checkpoint tree of a run without it is unchanged)."""

    batch_stats: Any
    ema_params: Any = None


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


# ---------------------------------------------------------------------------------- optimiser
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

    backbone = (
        optax.set_to_zero()
        if config.model.freeze_backbone
        else optimizer(train.backbone_lr_multiplier)
    )

    def label(params):
        return {
            name: jax.tree.map(
                lambda _, group="backbone" if name == "backbone" else "head": group, sub
            )
            for name, sub in params.items()
        }

    tx = optax.multi_transform({"backbone": backbone, "head": optimizer(1.0)}, label)
    if train.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(train.grad_clip), tx)
    return tx


def _update_count(opt_state) -> jax.Array:
    """The count that the next update passes to the head's learning-rate schedule, read from the
    optimiser state (`ScaleByScheduleState`; the head's, which is the last one found)."""
    states = jax.tree.leaves(
        opt_state, is_leaf=lambda node: isinstance(node, optax.ScaleByScheduleState)
    )
    counts = [node.count for node in states if isinstance(node, optax.ScaleByScheduleState)]
    return counts[-1]


# ---------------------------------------------------------------------------------- state
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
    from fdh_jax.models import pretrained  # noqa: PLC0415 - only runs that load weights need it

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
        measurements["lr"] = schedule(_update_count(state.opt_state))
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


# ---------------------------------------------------------------------------------- logging
def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class _Throughput:
    """Images per second since the previous log line."""

    def __init__(self, batch_size: int):
        self.batch_size, self.steps, self.since = batch_size, 0, time.perf_counter()

    def stepped(self) -> None:
        self.steps += 1

    def rate(self) -> float:
        """Images per second since the last call (or the start), and starts a new window."""
        now = time.perf_counter()
        rate = self.steps * self.batch_size / max(now - self.since, 1e-9)
        self.steps, self.since = 0, now
        return rate


def _log_step(step: int, total: int, measurements: dict, throughput: _Throughput, writer) -> None:
    """Prints and writes the step's measurements (fetched from the devices: this waits for the
    step); `FloatingPointError` if any is not finite."""
    metrics = {k: float(v) for k, v in jax.device_get(measurements).items()}
    if not all(math.isfinite(v) for v in metrics.values()):
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        raise FloatingPointError(f"non-finite {', '.join(bad)} at step {step}")
    rate = throughput.rate()
    eta = (total - step) * throughput.batch_size / max(rate, 1e-9)
    report(
        f"step {step}/{total} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
        f"{rate:.0f} img/s | ETA {_format_seconds(eta)}"
    )
    if writer is not None:
        writer.write(
            step, metrics | {"batch_size": throughput.batch_size, "images_per_second": rate}
        )


def _log_validation(step: int, total: int, scores: dict, writer) -> None:
    lengths = " ".join(f"{k}:{100 * v:.2f}" for k, v in scores.items() if k != "mean")
    report(f"step {step}/{total} | validation mAP x100 {lengths} | mean {100 * scores['mean']:.2f}")
    if writer is not None:
        writer.write(step, {f"validation/mAP_{k}": v for k, v in scores.items()})


# ---------------------------------------------------------------------------------- main entry
def total_train_steps(config: ml_collections.ConfigDict, num_database: int) -> int:
    if config.train.num_steps > 0:
        return int(config.train.num_steps)
    steps_per_epoch = max(1, num_database // config.train.batch_size)
    return max(1, math.ceil(config.train.num_epochs * steps_per_epoch))


class Run(NamedTuple):
    """Everything a run needs, restored from its workdir."""

    mesh: jax.sharding.Mesh
    database: Any
    query: Any
    total_steps: int
    model: Any
    state: TrainState
    manager: ocp.CheckpointManager
    progress: dict


def prepare_run(
    config: ml_collections.ConfigDict, workdir: Path, *, check_images: bool = True
) -> Run:
    """Validates the config, opens the data, builds the model and restores the latest state.

    `check_images=False` skips the scan for unreadable images (for encoding and search, which
    report a bad image when they meet it).
    """
    validate_config(config, jax.device_count())
    # A run with checkpoints takes every weight from them: the weights file is needed (and
    # checked, before the data is read: a missing file or download fails in seconds) only for
    # a run that starts from scratch.
    weights = "" if inference.checkpoint_steps(workdir) else config.model.pretrained
    if weights:
        from fdh_jax.models import pretrained  # noqa: PLC0415 - only runs that load weights

        pretrained.resolve_weights_path(weights)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh()
    splits = load_splits(config, ("train", "test"), check_images=check_images)
    database, query = splits["train"], splits["test"]
    total_steps = total_train_steps(config, len(database))
    model = build_model(config, database.num_classes)
    calibration = None
    if weights:  # the first training images, in index order: deterministic
        calibration = np.stack(
            [
                eval_transform(
                    database[i]["image"], config.data.image_size, config.data.eval_resize
                )
                for i in range(min(32, len(database)))
            ]
        )
    state = create_train_state(
        config, model, make_optimizer(config, total_steps), mesh, calibration, bool(weights)
    )
    manager, state, progress, restored = checkpointing.restore_latest_intact(workdir, config, state)
    if restored is not None:
        report(f"Restored {workdir / 'checkpoints'} at step {restored}.")
    progress = progress or {"train_seconds": 0.0}
    return Run(mesh, database, query, total_steps, model, state, manager, progress)


def _evaluate_and_report(
    run: Run,
    config,
    workdir: Path,
    train_seconds: float,
    inputs: tuple[Any, Any],
    extra_results: dict | None = None,
) -> dict:
    steps = int(run.state.step)
    results = evaluate.evaluate_and_report(
        run.model,
        evaluate.state_variables(run.state),
        run.query,
        run.database,
        config,
        run.mesh,
        workdir,
        steps=steps,
        train_seconds=train_seconds,
        extra_results=extra_results,
        inputs=inputs,
    )
    if jax.process_index() == 0:
        with MetricWriter(workdir, jsonl=False) as writer:
            writer.write(steps, {f"eval/mAP_{k}": v for k, v in results["mAP"].items()})
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains FDH-MFE (resuming from `workdir`), evaluates, writes `workdir/results.json`.

    Returns the results dict (docs/design.md, "Contracts"). On a preemption notice (SIGTERM) it
    saves the checkpoint of the current step and raises `checkpointing.Preempted`; the next start
    resumes from it.
    """
    workdir = Path(workdir)
    run = prepare_run(config, workdir)
    start_step = int(run.state.step)
    if jax.process_index() == 0:  # the workdir's record of the model (see fdh_jax/inference.py)
        inference.record_training_run(workdir, config, run.database, resuming=start_step > 0)
    # A frozen backbone's stage maps come from the feature cache (computed on first use).
    backbone_variables = {
        "params": run.state.params.get("backbone", {}),
        "batch_stats": run.state.batch_stats.get("backbone", {}),
    }
    database_inputs, query_inputs = feature_cache.cached_splits(
        config, run.database, run.query, backbone_variables, run.mesh
    )
    train_inputs, validation = selection.validation_sources(config, database_inputs)
    tracker = selection.Selection(config, run.progress)
    train_seconds = float(run.progress["train_seconds"])
    state = run.state
    if start_step < run.total_steps:
        state, seconds = _train(config, workdir, run, train_inputs, validation, tracker)
        train_seconds += seconds
    else:
        report(f"Checkpoint at step {start_step} is final: evaluating without training.")

    selected = None
    if validation is not None:
        selected = tracker.chosen(validation, int(state.step))
        if selected["step"] != int(state.step):
            state, _ = checkpointing.restore_checkpoint(run.manager, state, selected["step"])
            report(f"Selected step {selected['step']} (best validation mAP).")
    results = _evaluate_and_report(
        run._replace(state=state),
        config,
        workdir,
        train_seconds,
        (query_inputs, database_inputs),
        None if selected is None else {"selected": selected},
    )
    run.manager.close()
    return results


def _train(config, workdir: Path, run: Run, train_inputs, validation, tracker) -> tuple:
    """The training loop from the restored step to `run.total_steps`: update, log, validate,
    checkpoint; `(final state, seconds spent)`. Seals every checkpoint it leaves behind."""
    start_step, total_steps = int(run.state.step), run.total_steps
    report(
        f"Training {config.model.backbone} on {config.data.name} ({len(run.database)} images, "
        f"{run.database.num_classes} classes) for {total_steps} steps, batch "
        f"{config.train.batch_size}, {jax.device_count()} device(s)."
    )
    dataset = train_dataset(
        train_inputs,
        config,
        total_steps,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        first_step=start_step,
    )
    step_fn = make_train_step(config, run.mesh, total_steps)
    state, iterator, started = run.state, iter(dataset), time.perf_counter()
    writer = MetricWriter(workdir, resumed_at=start_step) if jax.process_index() == 0 else None
    throughput = _Throughput(config.train.batch_size)
    checkpoints = workdir / "checkpoints"
    try:
        with checkpointing.PreemptionNotice() as notice:
            for step in range(start_step + 1, total_steps + 1):
                batch = parallel.global_batch(next(iterator), run.mesh)
                state, measurements = step_fn(state, batch)
                throughput.stepped()
                if step % config.train.log_every == 0 or step == total_steps:
                    _log_step(step, total_steps, measurements, throughput, writer)
                scores = _validate_if_due(config, run, step, state, validation, tracker, writer)
                preempted = notice.reached(run.manager, step)
                if _checkpoint_due(config, step, total_steps, preempted, scores is not None):
                    elapsed = float(run.progress["train_seconds"]) + time.perf_counter() - started
                    metrics = (
                        None
                        if scores is None
                        else {checkpointing.VALIDATION_METRIC: scores["mean"]}
                    )
                    progress = {"train_seconds": elapsed} | tracker.progress()
                    checkpointing.save_checkpoint(run.manager, step, state, progress, metrics)
                    checkpointing.seal_checkpoints(checkpoints)  # the earlier ones
                if preempted and step < total_steps:
                    run.manager.wait_until_finished()
                    checkpointing.seal_checkpoints(checkpoints)
                    run.manager.close()
                    raise checkpointing.Preempted(step, checkpoints)
    finally:
        run.manager.wait_until_finished()
        checkpointing.seal_checkpoints(checkpoints)
        if writer is not None:
            writer.close()
    return state, time.perf_counter() - started


def _validate_if_due(
    config, run: Run, step: int, state, validation, tracker, writer
) -> dict | None:
    """Validation scores at `step` (every `eval.every` steps and at the last one), recorded in
    `tracker` and logged; None when no validation is due."""
    due = step == run.total_steps or (config.eval.every > 0 and step % config.eval.every == 0)
    if validation is None or not due:
        return None
    scores = selection.validation_scores(run.model, state, validation, config, run.mesh)
    tracker.record(step, scores)
    _log_validation(step, run.total_steps, scores, writer)
    return scores


def _checkpoint_due(config, step: int, total_steps: int, preempted: bool, validated: bool) -> bool:
    """Every `train.checkpoint_every` steps, at the last step, on preemption, and after each
    validation when the best checkpoint is to be kept."""
    return (
        step % config.train.checkpoint_every == 0
        or step == total_steps
        or preempted
        or (validated and config.eval.select == "best")
    )
