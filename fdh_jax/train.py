"""Training: `train_and_evaluate(config, workdir)`.

One linear procedure in banner sections: config check, mesh, data, model, optimiser, checkpoint,
loop, evaluation. The update step is one `jax.jit` over the `('data',)` mesh. Everything that
decides a run's trajectory (parameters, optimiser state, step) is in the checkpoint, and the
batches and augmentation are pure functions of (seed, step), so a run that is killed and
restarted from its workdir, with any number of input workers or threads, ends exactly where an
uninterrupted run would.
"""

import json
import math
import signal
import threading
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

from fdh_jax import evaluate, feature_cache, inference, parallel
from fdh_jax.atomic_files import write_text_atomically
from fdh_jax.checksums import file_record, files_problem
from fdh_jax.data import load_splits, validation_split
from fdh_jax.data.decode import SubsetSource
from fdh_jax.data.pipeline import model_inputs, train_dataset
from fdh_jax.data.transforms import eval_transform
from fdh_jax.losses import total_loss
from fdh_jax.models.backbones import get_backbone
from fdh_jax.models.fdh import build_model
from fdh_jax.summaries import MetricWriter
from fdh_jax.validation import ConfigError, validate_config


class TrainState(train_state.TrainState):
    """Parameters, optimiser state and step, plus BatchNorm statistics."""

    batch_stats: Any


# ---------------------------------------------------------------------------------- optimiser
def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """Warm-up + cosine schedule; SGD-momentum or AdamW; the backbone at its own rate or frozen."""
    train = config.train
    warmup = min(train.warmup_steps, max(total_steps - 1, 0))

    def schedule(multiplier: float) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            0.0, train.learning_rate * multiplier, warmup, max(total_steps, warmup + 1), 0.0
        )

    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)

    def optimizer(multiplier: float) -> optax.GradientTransformation:
        if train.optimizer == "adamw":
            return optax.adamw(
                schedule(multiplier), weight_decay=train.weight_decay, mask=decay_mask
            )
        return optax.chain(
            optax.add_decayed_weights(train.weight_decay, mask=decay_mask),
            optax.sgd(schedule(multiplier), momentum=train.momentum),
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


def learning_rate(config: ml_collections.ConfigDict, total_steps: int, step: int) -> float:
    """The head learning rate at `step` (for logging)."""
    warmup = min(config.train.warmup_steps, max(total_steps - 1, 0))
    fn = optax.warmup_cosine_decay_schedule(
        0.0, config.train.learning_rate, warmup, max(total_steps, warmup + 1), 0.0
    )
    return float(fn(step))


# ---------------------------------------------------------------------------------- state
def create_train_state(
    config: ml_collections.ConfigDict,
    model,
    tx: optax.GradientTransformation,
    mesh,
    calibration_images: np.ndarray | None = None,
) -> TrainState:
    """Initialises the replicated train state from `config.seed` (jitted: created on device).

    With `config.model.pretrained`, the backbone's variables are replaced by the weights file's.
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
    if config.model.pretrained:
        state = _with_pretrained_backbone(config, state, tx, calibration_images)
        state = jax.device_put(state, parallel.replicated(mesh))
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
):
    """One update on a global batch; returns `(new_state, measurements)`.

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
    measurements = {
        "loss": loss,
        **parts,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(new_state.params),
    }
    return new_state, measurements


# ---------------------------------------------------------------------------------- checkpoints
VALIDATION_METRIC = "validation_mAP"  # saved with a checkpoint: mean over the code lengths


def checkpoint_manager(workdir: Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """Orbax manager of `workdir/checkpoints`: the newest `train.keep_checkpoints`, and with
    `eval.select=best` also the checkpoint of the best validation mAP (ties: the later step)."""
    if config.eval.select == "best":
        preservation = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(config.train.keep_checkpoints),
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[VALIDATION_METRIC],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation, create=True, enable_async_checkpointing=True
        )
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.train.keep_checkpoints, create=True, enable_async_checkpointing=True
        )
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


CHECKSUMS = "fdh_checksums.json"  # in each finished step directory: SHA-256 of every file


class DamagedCheckpointsError(RuntimeError):
    """Every checkpoint of a workdir is unreadable (nothing is deleted)."""


def seal_checkpoints(directory: Path) -> None:
    """Writes `CHECKSUMS` (size and SHA-256 of each file) into every finished step directory of
    `directory` that has none, so that a later restore can tell damaged bytes from good ones
    (Orbax's files carry no checksums). Orbax renames a step to its bare number only when the
    save is complete, and `manager.save` waits for the previous save, so callers seal after a
    save has been waited for."""
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for step_dir in directory.iterdir():
        if not step_dir.name.isdigit() or (step_dir / CHECKSUMS).exists():
            continue
        files = sorted(f for f in step_dir.rglob("*") if f.is_file())
        manifest = {str(f.relative_to(step_dir)): file_record(f) for f in files}
        write_text_atomically(step_dir / CHECKSUMS, json.dumps(manifest, indent=1) + "\n")


def checkpoint_damage(step_dir: Path) -> str | None:
    """Why the sealed checkpoint `step_dir` is damaged (None if intact, or never sealed)."""
    try:
        manifest = json.loads((step_dir / CHECKSUMS).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return f"unreadable {CHECKSUMS} ({error})"
    return files_problem(step_dir, manifest)


def restore_latest_intact(
    workdir: Path, config: ml_collections.ConfigDict, state: TrainState
) -> tuple[ocp.CheckpointManager, TrainState, dict | None, int | None]:
    """`(manager, state, progress, step)` from the newest checkpoint that reads back intact.

    A damaged newer checkpoint (checksum mismatch, missing or truncated file, or a restore
    that fails) is named in one line and moved to `workdir/damaged_checkpoints/` (Orbax would
    otherwise refuse to save that step again); training continues from the previous one, and
    since batches are a pure function of the step it ends as an uninterrupted run would. With
    checkpoints but none intact: `DamagedCheckpointsError`, nothing moved or deleted.
    """
    directory = workdir / "checkpoints"
    steps = sorted(inference.checkpoint_steps(workdir), reverse=True)
    problems = []
    for step in steps:
        problem = checkpoint_damage(directory / str(step))
        if problem is None:
            manager = checkpoint_manager(workdir, config)
            try:
                restored, progress = restore_checkpoint(manager, state, step)
            except Exception as error:  # noqa: BLE001 - tensorstore/Orbax raise many kinds
                manager.close()
                problem = str(error).strip().splitlines()[0][:200] if str(error) else repr(error)
            else:
                if problems and jax.process_index() == 0:
                    aside = workdir / "damaged_checkpoints"
                    aside.mkdir(exist_ok=True)
                    for damaged, _ in problems:
                        (directory / str(damaged)).rename(aside / str(damaged))
                    manager.close()
                    manager = checkpoint_manager(workdir, config)
                return manager, restored, progress, step
        problems.append((step, problem))
        report(f"Checkpoint {directory / str(step)} is damaged ({problem}).")
    if problems:
        raise DamagedCheckpointsError(
            f"no intact checkpoint in {directory} (steps {', '.join(str(s) for s, _ in problems)}"
            " are damaged; nothing was deleted): move the directory away to train from scratch"
        )
    return checkpoint_manager(workdir, config), state, None, None


def restore_checkpoint(manager: ocp.CheckpointManager, state: TrainState, step: int):
    """Restores `(state, progress)` saved at `step` onto the shardings of `state`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()
        ),
    )
    return restored.state, restored.progress


def save_checkpoint(
    manager: ocp.CheckpointManager,
    step: int,
    state: TrainState,
    progress: dict,
    metrics: dict | None = None,
):
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
        ),
        metrics=metrics,
    )


# ---------------------------------------------------------------------------------- validation
def validation_sources(config: ml_collections.ConfigDict, database: Any) -> tuple[Any, Any]:
    """`(training part, validation)` of the database inputs; `validation` is `(queries,
    database)` for scoring (the held-out images against the training part), or None when
    `eval.validation_fraction` is 0. The query split is never touched."""
    fraction = config.eval.validation_fraction
    if fraction <= 0:
        return database, None
    train, held_out = validation_split(database.labels, fraction, config.eval.validation_seed)
    if held_out.size == 0:
        raise ConfigError(
            "eval.validation_fraction",
            f"{fraction} holds out no image of the {len(database)} database images (each "
            "class keeps at least one for training): raise it or set 0",
        )
    training = SubsetSource(database, train)
    return training, (SubsetSource(database, held_out), training)


def validation_scores(model, state: TrainState, validation: tuple[Any, Any], config, mesh):
    """mAP@all per code length of the held-out images against the training part, and their
    mean over the code lengths (`"mean"`: what `eval.select=best` ranks)."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    queries, database = validation
    query_codes, query_labels = evaluate.encode_source(model, variables, queries, config, mesh)
    db_codes, db_labels = evaluate.encode_source(model, variables, database, config, mesh)
    scores = {
        k: float(
            evaluate.mean_average_precision(
                query_codes[k],
                db_codes[k],
                query_labels,
                db_labels,
                tie_break=config.eval.tie_break,
            )
        )
        for k in map(str, config.bits)
    }
    return scores | {"mean": float(np.mean(list(scores.values())))}


# ---------------------------------------------------------------------------------- logging
def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def report(message: str) -> None:
    """Progress output, from process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


def _log_step(step: int, total: int, metrics: dict, images_per_second: float, writer) -> None:
    eta = (total - step) * (metrics["batch_size"] / max(images_per_second, 1e-9))
    report(
        f"step {step}/{total} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
        f"{images_per_second:.0f} img/s | ETA {_format_seconds(eta)}"
    )
    if writer is not None:
        writer.write(step, {**metrics, "images_per_second": images_per_second})


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


class Preempted(Exception):  # noqa: N818 - it is an outcome, not a fault
    """Training stopped on a preemption notice after saving the checkpoint of `step`."""

    def __init__(self, step: int, directory: Path):
        super().__init__(
            f"preempted: saved the checkpoint of step {step} in {directory}; "
            "run the same command again to resume"
        )
        self.step = step


class PreemptionNotice:
    """Context manager: `reached(manager, step)` says when to save and stop.

    One process: a SIGTERM handler sets a flag, read after each step. Several processes: the
    processes must stop at the same step, so the notice comes from JAX's preemption service
    (its own SIGTERM notifier, or the TPU maintenance event), which agrees on a step across
    hosts: `manager.reached_preemption(step)`. A Python handler would replace that notifier.
    """

    def __enter__(self) -> "PreemptionNotice":
        self.signalled = False
        self._previous = None
        self._installed = (
            jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
        )
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.signalled = True

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

    def reached(self, manager: ocp.CheckpointManager, step: int) -> bool:
        # Called at every step on every process: the multi-host sync point requires it.
        return manager.reached_preemption(step) or self.signalled


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
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh()
    splits = load_splits(config, ("train", "test"), check_images=check_images)
    database, query = splits["train"], splits["test"]
    total_steps = total_train_steps(config, len(database))
    model = build_model(config, database.num_classes)
    calibration = None
    if config.model.pretrained:  # the first training images, in index order: deterministic
        calibration = np.stack(
            [
                eval_transform(
                    database[i]["image"], config.data.image_size, config.data.eval_resize
                )
                for i in range(min(32, len(database)))
            ]
        )
    state = create_train_state(
        config, model, make_optimizer(config, total_steps), mesh, calibration
    )
    manager, state, progress, restored = restore_latest_intact(workdir, config, state)
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
    variables = {"params": run.state.params, "batch_stats": run.state.batch_stats}
    steps = int(run.state.step)
    results = evaluate.evaluate_and_report(
        run.model,
        variables,
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

    Returns the results dict (DESIGN section 3). On a preemption notice (SIGTERM) it saves the
    checkpoint of the current step and raises `Preempted`; the next start resumes from it.
    """
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    run = prepare_run(config, workdir)
    mesh, total_steps, manager, state, progress = (
        run.mesh,
        run.total_steps,
        run.manager,
        run.state,
        run.progress,
    )
    start_step = int(state.step)
    if is_main:  # the workdir's record of the model (see fdh_jax/inference.py)
        inference.record_training_run(workdir, config, run.database, resuming=start_step > 0)
    # A frozen backbone's stage maps come from the feature cache (computed on first use).
    backbone_variables = {
        "params": state.params.get("backbone", {}),
        "batch_stats": state.batch_stats.get("backbone", {}),
    }
    database_inputs, query_inputs = feature_cache.cached_splits(
        config, run.database, run.query, backbone_variables, mesh
    )
    train_inputs, validation = validation_sources(config, database_inputs)
    dataset = train_dataset(
        train_inputs,
        config,
        total_steps,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        first_step=start_step,
    )

    # ---- loop
    step_fn = jax.jit(
        partial(
            train_step,
            loss_config=config.loss,
            grad_accum_steps=config.train.grad_accum_steps,
            micro_batch_sharding=parallel.micro_batch_sharding(mesh),
        ),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=0,
    )
    train_seconds = float(progress["train_seconds"])
    scored = progress.get("validation")  # {"step", "mAP"}: the latest validation scores
    best = progress.get("best")  # {"step", "mAP"}: the best so far (ties: the later step)
    if start_step < total_steps:
        report(
            f"Training {config.model.backbone} on {config.data.name} ({len(run.database)} images, "
            f"{run.database.num_classes} classes) for {total_steps} steps, batch "
            f"{config.train.batch_size}, {jax.device_count()} device(s)."
        )
        iterator = iter(dataset)
        writer = MetricWriter(workdir, resumed_at=start_step) if is_main else None
        window_start, window_steps = time.perf_counter(), 0
        segment_start = time.perf_counter()
        try:
            with PreemptionNotice() as notice:
                for step in range(start_step + 1, total_steps + 1):
                    batch = parallel.global_batch(next(iterator), mesh)
                    state, measurements = step_fn(state, batch)
                    window_steps += 1
                    if step % config.train.log_every == 0 or step == total_steps:
                        metrics = {k: float(v) for k, v in jax.device_get(measurements).items()}
                        if not all(math.isfinite(v) for v in metrics.values()):
                            bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
                            raise FloatingPointError(f"non-finite {', '.join(bad)} at step {step}")
                        now = time.perf_counter()
                        rate = window_steps * config.train.batch_size / (now - window_start)
                        window_start, window_steps = now, 0
                        metrics |= {
                            "lr": learning_rate(config, total_steps, step),
                            "batch_size": config.train.batch_size,
                        }
                        _log_step(step, total_steps, metrics, rate, writer)
                    validating = validation is not None and (
                        step == total_steps
                        or (config.eval.every > 0 and step % config.eval.every == 0)
                    )
                    if validating:
                        scores = validation_scores(run.model, state, validation, config, mesh)
                        scored = {"step": step, "mAP": scores}
                        if best is None or scores["mean"] >= best["mAP"]["mean"]:
                            best = scored
                        _log_validation(step, total_steps, scores, writer)
                    preempted = notice.reached(manager, step)
                    if (
                        step % config.train.checkpoint_every == 0
                        or step == total_steps
                        or preempted
                        or (validating and config.eval.select == "best")
                    ):
                        elapsed = train_seconds + time.perf_counter() - segment_start
                        save_checkpoint(
                            manager,
                            step,
                            state,
                            {
                                "train_seconds": elapsed,
                                "validation": scored,
                                "best": best,
                            },
                            {VALIDATION_METRIC: scored["mAP"]["mean"]} if validating else None,
                        )
                        seal_checkpoints(workdir / "checkpoints")  # the earlier ones
                    if preempted and step < total_steps:
                        manager.wait_until_finished()
                        seal_checkpoints(workdir / "checkpoints")
                        manager.close()
                        raise Preempted(step, workdir / "checkpoints")
        finally:
            manager.wait_until_finished()
            seal_checkpoints(workdir / "checkpoints")
            if writer is not None:
                writer.close()
        train_seconds += time.perf_counter() - segment_start
    else:
        report(f"Checkpoint at step {start_step} is final: evaluating without training.")

    # ---- evaluation
    selected = None
    if validation is not None:
        chosen = best if config.eval.select == "best" else scored
        selected = {
            "rule": "best validation mAP" if config.eval.select == "best" else "last step",
            "step": int(chosen["step"]) if config.eval.select == "best" else int(state.step),
            "validation_mAP": chosen["mAP"],
            "validation_queries": len(validation[0]),
            "validation_database": len(validation[1]),
        }
        if selected["step"] != int(state.step):
            state, _ = restore_checkpoint(manager, state, selected["step"])
            report(f"Selected step {selected['step']} (best validation mAP).")
    results = _evaluate_and_report(
        run._replace(state=state),
        config,
        workdir,
        train_seconds,
        (query_inputs, database_inputs),
        None if selected is None else {"selected": selected},
    )
    manager.close()
    return results
