"""`--mode=eval`: score a trained workdir's checkpoint without training.

The model comes from the workdir (`fdh_jax.serving.workdir_encoder.restore_encoder`), the data
from its training config (or `--eval_data`, a folder dataset), the scoring from
`fdh_jax.evaluation`.
"""

from pathlib import Path

import ml_collections

from fdh_jax.data import load_splits
from fdh_jax.evaluation.evaluate import evaluate_and_report
from fdh_jax.search import adaptation
from fdh_jax.serving.workdir_encoder import restore_encoder
from fdh_jax.training.checkpointing import checkpoint_progress
from fdh_jax.training.code_fitting import fitted_codes_label


def evaluate_checkpoint(
    workdir: str | Path,
    config: ml_collections.ConfigDict | None = None,
    *,
    eval_data: str | None = None,
    step: int | None = None,
    adapt: bool = False,
) -> dict:
    """`--mode=eval`: scores a workdir's checkpoint (default: the latest) without training.

    The model always comes from the workdir (`config.json`, `model.json`, the checkpoint): no
    pretrained-weights file and no optimiser. `config` (default: the workdir's) supplies the
    data and evaluation settings.

    Without `eval_data`, the training dataset's query split is ranked against its database split
    and `workdir/results.json` is (re)written. With `eval_data`, a folder dataset (the layout and
    split rules of `configs/folder.py`: `split.csv`, else a per-class split seeded by the training
    seed with `data.test_fraction`) whose classes may be ones the model never saw; the results go
    to `workdir/eval/<folder name>/` and the training `results.json` is left alone.

    `adapt`: score codes fitted to the database split without its labels
    (`fdh_jax.search.adaptation`: PCA-ITQ on the transfer features,
    `config.eval.adapt_descriptor_weight`) instead of the hash heads' codes, for classes the
    model never trained on; the results go to `workdir/eval/<folder name or "train">_adapted/`.
    """

    workdir = Path(workdir)
    encoder = restore_encoder(workdir, step, config)
    config = encoder.config
    extra = {}
    if eval_data:
        config = config.copy_and_resolve_references()
        config.data.name, config.data.root = "folder", str(eval_data)
        output_dir = workdir / "eval" / Path(eval_data).resolve().name
        extra = {"eval_data": str(Path(eval_data).resolve()), "checkpoint_step": encoder.step}
    else:
        output_dir = workdir
    if encoder.fit_report is not None and encoder.fit_report["weight"] is not None and not adapt:
        extra |= {"checkpoint_step": encoder.step, "codes": fitted_codes_label(encoder.fit_report)}
    if adapt:
        weight = adaptation.descriptor_weight(config)
        name = Path(eval_data).resolve().name if eval_data else "train"
        output_dir = workdir / "eval" / f"{name}_adapted"
        extra |= {"checkpoint_step": encoder.step, "codes": adaptation.adapted_codes_label(weight)}
    splits = load_splits(config, ("train", "test"))
    database, query = splits["train"], splits["test"]
    progress = checkpoint_progress(workdir, encoder.step)
    return evaluate_and_report(
        encoder.model,
        encoder.variables,
        query,
        database,
        config,
        encoder.mesh,
        output_dir,
        steps=encoder.step,
        train_seconds=float(progress.get("train_seconds", 0.0)),
        extra_results=extra,
        adapt=adapt,
    )
