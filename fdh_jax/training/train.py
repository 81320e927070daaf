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
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fdh_jax import parallel
from fdh_jax.config_checks import validate_config
from fdh_jax.data import load_splits
from fdh_jax.data.pipeline import train_dataset
from fdh_jax.data.transforms import eval_transform
from fdh_jax.evaluation.evaluate import evaluate_and_report
from fdh_jax.models import pretrained
from fdh_jax.models.fdh import build_model
from fdh_jax.training import checkpointing, code_fitting, feature_cache, selection
from fdh_jax.training.optimizer import make_optimizer
from fdh_jax.training.step import TrainState, create_train_state, make_train_step, state_variables
from fdh_jax.training.summaries import MetricWriter, report
from fdh_jax.training.workdir import record_training_run


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
    weights = "" if checkpointing.checkpoint_steps(workdir) else config.model.pretrained
    if weights:
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
    variables: dict,
    config,
    workdir: Path,
    train_seconds: float,
    inputs: tuple[Any, Any],
    extra_results: dict | None = None,
) -> dict:
    steps = int(run.state.step)
    results = evaluate_and_report(
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

    Returns the results dict (docs/design.md, "Contracts"). On a preemption notice (SIGTERM) it
    saves the checkpoint of the current step and raises `checkpointing.Preempted`; the next start
    resumes from it.
    """
    workdir = Path(workdir)
    run = prepare_run(config, workdir)
    start_step = int(run.state.step)
    if (
        jax.process_index() == 0
    ):  # the workdir's record of the model (see fdh_jax/training/workdir.py)
        record_training_run(workdir, config, run.database, resuming=start_step > 0)
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
    variables, fit_report = code_fitting.fitted_variables(
        workdir,
        int(state.step),
        run.model,
        state_variables(state),
        train_inputs,
        validation,
        config,
        run.mesh,
    )
    extra = {} if selected is None else {"selected": selected}
    if fit_report is not None:
        extra["fitted_codes"] = fit_report
    results = _evaluate_and_report(
        run._replace(state=state),
        variables,
        config,
        workdir,
        train_seconds,
        (query_inputs, database_inputs),
        extra,
    )
    run.manager.close()
    return results


def _training_share(run: Run, train_inputs) -> str:
    """What trains, for the start line: `2944 images, 100 classes`, or with a validation split
    `1034 of 1481 images, 35 of 50 classes` (`eval.validation_by=classes` holds classes out)."""
    total, classes = len(run.database), int(np.unique(run.database.labels).size)
    if len(train_inputs) == total:
        return f"{total} images, {classes} classes"
    trained = int(np.unique(np.asarray(train_inputs.labels)).size)
    return f"{len(train_inputs)} of {total} images, {trained} of {classes} classes"


def _train(config, workdir: Path, run: Run, train_inputs, validation, tracker) -> tuple:
    """The training loop from the restored step to `run.total_steps`: update, log, validate,
    checkpoint; `(final state, seconds spent)`. Seals every checkpoint it leaves behind."""
    start_step, total_steps = int(run.state.step), run.total_steps
    share = _training_share(run, train_inputs)
    report(
        f"Training {config.model.backbone} on {config.data.name} ({share}) for {total_steps} "
        f"steps, batch {config.train.batch_size}, {jax.device_count()} device(s)."
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
