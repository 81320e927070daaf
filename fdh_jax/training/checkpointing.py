"""Checkpoints of a training run: Orbax management, seals, damage-tolerant restore, preemption.

A checkpoint holds the train state and a small `progress` record (training seconds, the latest
and best validation scores). Each finished step directory is sealed with `fdh_checksums.json`
(size and SHA-256 of every file, which Orbax's files lack), so that a restart can tell a
damaged checkpoint from an intact one and resume from the newest intact one
(docs/design.md, "Contracts").

All of the checkpoint layout lives here: `WORKDIR/checkpoints/<step>/{state,progress}`, which
steps are complete (`checkpoint_steps`), and reading one checkpoint's variables outside training
(`restore_variables`, for `fdh_jax.serving`) or its progress record (`checkpoint_progress`).
"""

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from fdh_jax.common.atomic_files import write_text_atomically
from fdh_jax.common.checksums import file_record, files_problem
from fdh_jax.training.summaries import report
from fdh_jax.training.workdir import ModelFileError

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
    workdir: Path, config: ml_collections.ConfigDict, state: Any
) -> tuple[ocp.CheckpointManager, Any, dict | None, int | None]:
    """`(manager, state, progress, step)` from the newest checkpoint that reads back intact.

    A damaged newer checkpoint (checksum mismatch, missing or truncated file, or a restore
    that fails) is named in one line and moved to `workdir/damaged_checkpoints/` (Orbax would
    otherwise refuse to save that step again); training continues from the previous one, and
    since batches are a pure function of the step it ends as an uninterrupted run would. With
    checkpoints but none intact: `DamagedCheckpointsError`, nothing moved or deleted.
    """
    directory = workdir / "checkpoints"
    steps = sorted(checkpoint_steps(workdir), reverse=True)
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


def restore_checkpoint(manager: ocp.CheckpointManager, state: Any, step: int) -> tuple[Any, dict]:
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
    state: Any,
    progress: dict,
    metrics: dict | None = None,
) -> None:
    """Starts saving `(state, progress)` as `step` (asynchronous; `metrics` feed the best-checkpoint
    policy). Tests replace this function to fail or die at a chosen save."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
        ),
        metrics=metrics,
    )


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


class NoCheckpointError(FileNotFoundError):
    """A workdir (or a requested step) without a checkpoint to restore."""


# --------------------------------------- the steps of a workdir, and reading one outside training
def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in `workdir/checkpoints`, ascending.

    Orbax writes a step into a temporary directory and renames it to the bare step number when
    it is complete, so only bare numbers count.
    """
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    steps = []
    for entry in directory.iterdir():
        if entry.is_dir() and entry.name.isdigit() and (entry / "state").is_dir():
            steps.append(int(entry.name))
    return sorted(steps)


def _select_step(workdir: Path, step: int | None) -> int:
    steps = checkpoint_steps(workdir)
    if not steps:
        raise NoCheckpointError(f"no checkpoint in {workdir / 'checkpoints'}: train first")
    if step is None:  # the model the workdir's results.json scored (eval.select), else the latest
        try:
            scored = int(json.loads((workdir / "results.json").read_text())["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            scored = None
        return scored if scored in steps else steps[-1]
    if step not in steps:
        raise NoCheckpointError(
            f"no checkpoint of step {step} in {workdir / 'checkpoints'} "
            f"(steps there: {', '.join(map(str, steps))})"
        )
    return step


def restore_variables(
    workdir: str | os.PathLike,
    abstract_variables: dict,
    step: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
    *,
    moving_average: bool = False,
) -> tuple[dict, int]:
    """`({"params", "batch_stats"}, step)` of checkpoint `step` (default: the latest).

    `abstract_variables` gives the tree and shapes (`jax.eval_shape` of the model's init); only
    those arrays are read from the checkpoint (no optimiser state), onto `sharding` (default:
    the first device). `moving_average`: `"params"` are the parameters' moving average that the
    run kept (`train.ema_decay > 0`), the variables its evaluation used.
    """
    workdir = Path(workdir)
    step = _select_step(workdir, step)
    params_key = "ema_params" if moving_average else "params"
    tree = {
        params_key: abstract_variables["params"],
        "batch_stats": abstract_variables.get("batch_stats", {}),
    }
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), tree)
    path = (workdir / "checkpoints" / str(step) / "state").absolute()
    try:
        variables = ocp.PyTreeCheckpointer().restore(
            path,
            args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args, partial_restore=True),
        )
    except (ValueError, KeyError) as error:
        raise ModelFileError(
            f"{path}: does not hold this model's variables ({str(error).splitlines()[0]})"
        ) from error
    return {"params": variables[params_key], "batch_stats": variables["batch_stats"]}, step


def checkpoint_progress(workdir: str | os.PathLike, step: int) -> dict:
    """The training progress saved with checkpoint `step` (`train_seconds`, data position)."""
    path = (Path(workdir) / "checkpoints" / str(step) / "progress").absolute()
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)
