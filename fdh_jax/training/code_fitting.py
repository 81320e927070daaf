"""Fitting the codes at the end of training (`eval.fitted_codes`).

The hash heads' codes are bound to the training classes; a linear hash of the backbone's pooled
C5 is not. With `eval.fitted_codes` a run ends by fitting, per code length K, a PCA-ITQ hash
(`fdh_jax.search.adaptation.fit_pca_itq`) of the blend `t_K = [unit(pooled), w * unit(h_K)]`
of its training images (the database split less its validation share; labels unused), and
every encoder then emits that hash's codes (`fdh_jax/models/fitted_codes.py`). A small `w` leans
on the generic C5 and carries over to species never trained on; a large one keeps the heads'
class geometry (docs/results.md, "Species never seen in training").

One weight for all code lengths, chosen on the run's validation split only (never the query
split): every `w` of `eval.fitted_code_weights` is fitted and its codes scored on the validation
queries (mAP@all against the validation database, as checkpoint selection scores); the chosen
`w` is the smallest whose mAP, averaged over the code lengths, is at most
`eval.fitted_code_tolerance` points (mAP x100) below the heads' own codes' average: the most
transfer the trained classes allow. If none is, the heads' codes stay. One weight over all
lengths, not one per length: a validation split of a few hundred queries ranks single lengths
noisily.

The fit is stored per checkpoint step in `workdir/fitted_codes/step_<S>.npz` (the folded hashes
and a JSON report of the choice, with the fingerprint of the parameters it was fitted for),
written atomically by process 0; a rerun on a finished workdir loads it instead of fitting
again, and restoring the checkpoint as an encoder (`fdh_jax.serving`) adds it to the variables
(refusing a fit made for other parameters).
"""

import json
import zipfile
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from fdh_jax import parallel
from fdh_jax.common.atomic_files import write_npz_atomically
from fdh_jax.common.checksums import (
    flatten_variables,
    unflatten_variables,
    variables_fingerprint,
)
from fdh_jax.encoding import continuous_outputs
from fdh_jax.evaluation.metrics import mean_average_precision
from fdh_jax.models.fitted_codes import FITTED, folded_hash
from fdh_jax.search import adaptation
from fdh_jax.training.summaries import report

FIT_DIR = "fitted_codes"
REPORT = "report"  # the npz entry holding the JSON report


def fit_path(workdir: str | Path, step: int) -> Path:
    return Path(workdir) / FIT_DIR / f"step_{int(step)}.npz"


def blend(outputs: dict, weight: float, bits: int) -> np.ndarray:
    """`[N, C5 + K]` float64: `[unit(pooled), weight * unit(h_K)]` of `continuous_outputs`."""
    return adaptation.transfer_features(outputs["pooled"], outputs[f"hash_{bits}"], weight)


def fold(hashes: dict[int, adaptation.CollectionHash], weight: float, pooled_dim: int) -> dict:
    """The folded form (`fdh_jax.models.fitted_codes`) of each length's hash of the blend."""
    return {
        str(k): folded_hash(hashed.mean, hashed.projection, weight, pooled_dim)
        for k, hashed in hashes.items()
    }


def validation_table(
    fit: dict, queries: dict, database: dict, bits: list[int], weights, tie_break: str
) -> tuple[dict[str, list[float]], dict[float, dict[int, adaptation.CollectionHash]]]:
    """Validation mAP per code length of the heads' codes (`"heads"`) and of the codes fitted
    on `fit` at each of `weights` (`"w=<weight>"`): `queries` search `database` (outputs of
    `continuous_outputs` with their `"label"`); and the hashes fitted, per weight and length."""

    def score(query_codes, db_codes) -> float:
        labels = (queries["label"], database["label"])
        return float(mean_average_precision(query_codes, db_codes, *labels, tie_break=tie_break))

    table = {
        "heads": [
            score(*(adaptation.binarise(o[f"hash_{k}"]) for o in (queries, database))) for k in bits
        ]
    }
    hashes = {}
    for weight in sorted(float(w) for w in weights):
        hashes[weight] = {k: adaptation.fit_pca_itq(blend(fit, weight, k), k, seed=0) for k in bits}
        table[f"w={weight:g}"] = [
            score(*(hashed(blend(o, weight, k)) for o in (queries, database)))
            for k, hashed in hashes[weight].items()
        ]
    return table, hashes


def choose_weight(table: dict[str, list[float]], tolerance: float) -> float | None:
    """The smallest weight whose mean validation mAP over the lengths is at most `tolerance`
    points of mAP x100 below the heads' (None: none is, the heads' codes stay)."""
    floor = float(np.mean(table["heads"])) - tolerance / 100
    allowed = [
        float(name[2:])
        for name, row in table.items()
        if name != "heads" and float(np.mean(row)) >= floor - 1e-9
    ]
    return min(allowed) if allowed else None


def fit_codes(
    model, variables: dict, training: Any, validation: tuple[Any, Any], config, mesh
) -> tuple[dict | None, dict]:
    """Chooses the weight on `validation` (`(queries, database)` sources) and fits on
    `training`; returns `(folded hashes or None, report)`."""

    def outputs(source: Any) -> dict:
        out = continuous_outputs(model, variables, source, config, mesh)
        return out | {"label": np.asarray(source.labels)}

    fit = outputs(training)
    queries = outputs(validation[0])
    database = fit if validation[1] is training else outputs(validation[1])
    bits = [int(k) for k in config.bits]
    weights, tie_break = config.eval.fitted_code_weights, config.eval.tie_break
    table, hashes = validation_table(fit, queries, database, bits, weights, tie_break)
    weight = choose_weight(table, float(config.eval.fitted_code_tolerance))
    fit_report = {
        "rule": "the smallest weight whose validation mAP (mean over the lengths) is within "
        f"{float(config.eval.fitted_code_tolerance):g} points (mAP x100) of the heads' codes'",
        "weight": weight,
        "validation_mAP": table,
        "validation_queries": len(queries["label"]),
        "fitted_on": len(fit["label"]),
    }
    folded = None if weight is None else fold(hashes[weight], weight, fit["pooled"].shape[1])
    return folded, fit_report


def settings(config: ml_collections.ConfigDict) -> dict:
    """What a stored fit must have been made with to be reused."""
    return {
        "bits": [int(k) for k in config.bits],
        "weights": sorted(float(w) for w in config.eval.fitted_code_weights),
        "tolerance": float(config.eval.fitted_code_tolerance),
        "validation": [
            float(config.eval.validation_fraction),
            int(config.eval.validation_seed),
            str(config.eval.validation_by),
        ],
    }


def save_fit(workdir: str | Path, step: int, folded: dict | None, fit_report: dict) -> Path:
    """Writes `fitted_codes/step_<step>.npz` atomically (the report alone when no fit)."""
    arrays = {REPORT: np.array(json.dumps(fit_report))} | flatten_variables(folded or {})
    fit_path(workdir, step).parent.mkdir(parents=True, exist_ok=True)
    return write_npz_atomically(fit_path(workdir, step), arrays)


def load_fit(workdir: str | Path, step: int) -> tuple[dict | None, dict] | None:
    """`(folded hashes or None, report)` stored for `step`, or None if nothing is; raises
    `ValueError` naming the file if it is unreadable."""
    path = fit_path(workdir, step)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            fit_report = json.loads(str(archive[REPORT]))
            flat = {name: np.asarray(archive[name]) for name in archive.files if name != REPORT}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is damaged ({error}): rerun the training command") from error
    return (unflatten_variables(flat) or None), fit_report


def with_fit(variables: dict, folded: dict | None, sharding) -> dict:
    """`variables` plus the fitted hashes (placed with `sharding`), or unchanged for None."""
    if folded is None:
        return variables
    # Every process holds the same arrays: each gives its own devices their (whole) copy.
    place = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])  # noqa: E731
    return {**variables, FITTED: jax.tree.map(place, folded)}


def fitted_variables(
    workdir: Path, step: int, model, variables: dict, training: Any, validation, config, mesh
) -> tuple[dict, dict | None]:
    """The variables a finished run reports and serves at `step`, and the fit's report (None
    without `eval.fitted_codes`): the fit stored for `step` with these settings, else a new
    one (fitted, then saved by process 0). Without `eval.fitted_codes` a fit stored for `step`
    is removed, so that the workdir's encoder is the one its results describe."""
    path = fit_path(workdir, step)
    if not config.eval.fitted_codes:
        if path.is_file() and jax.process_index() == 0:
            path.unlink()
            report(f"Removed {path}: eval.fitted_codes is off, the heads' codes are served.")
        return variables, None
    try:
        stored = load_fit(workdir, step)
    except ValueError as error:
        report(f"{error}; fitting again.")
        stored = None
    fingerprint = variables_fingerprint(variables)
    if (
        stored is not None
        and stored[1].get("settings") == settings(config)
        and stored[1].get("fingerprint") == fingerprint
    ):
        folded, fit_report = stored
    else:
        report(f"Fitting the codes of step {step} on the training images ...")
        folded, fit_report = fit_codes(model, variables, training, validation, config, mesh)
        fit_report |= {"settings": settings(config), "fingerprint": fingerprint}
        if jax.process_index() == 0:
            save_fit(workdir, step, folded, fit_report)
    chosen = fit_report["weight"]
    report(
        f"Fitted codes: weight {chosen:g} (validation mAP {_row(fit_report, f'w={chosen:g}')}, "
        f"heads' codes {_row(fit_report, 'heads')})"
        if chosen is not None
        else "Fitted codes: no weight keeps the validation mAP within the tolerance of the "
        "heads' codes; the heads' codes stay."
    )
    return with_fit(variables, folded, parallel.replicated(mesh)), fit_report


def _row(fit_report: dict, name: str) -> str:
    return " / ".join(f"{100 * v:.2f}" for v in fit_report["validation_mAP"][name])


def fitted_codes_label(fit_report: dict) -> str:
    """What `results.json` of `--mode=eval` says of fitted codes (`"codes"`)."""
    return (
        "fitted on the training images at the end of training (fdh_jax.training.code_fitting), "
        f"weight {fit_report['weight']:g}"
    )
