"""Evaluation: encode the query and database splits, score retrieval, report.

Protocol (docs/design.md, "Evaluation protocol"): database = train split, query = test split,
mAP over the whole database (mAP@all) for every code length, plus precision@k. Distance ties
are broken by database index unless `config.eval.tie_break` says otherwise.
"""

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from fdh_jax.encoding import encode_source, transfer_outputs
from fdh_jax.evaluation.figures import write_figures
from fdh_jax.evaluation.metrics import (
    mean_average_precision,
    precision_at_k,
    precision_recall_curve,
    precision_within_radius,
)
from fdh_jax.evaluation.results import (
    Evaluation,
    format_table,
    write_extra_metrics,
    write_results,
)
from fdh_jax.search import adaptation


def evaluate(
    model,
    variables: dict,
    query: Any,
    database: Any,
    config: ml_collections.ConfigDict,
    mesh,
) -> Evaluation:
    """Encodes both splits; mAP@all, precision@k, radius-2 precision and PR curves per length."""
    query_codes, query_labels = encode_source(model, variables, query, config, mesh)
    db_codes, db_labels = encode_source(model, variables, database, config, mesh)
    return score_codes(query_codes, db_codes, query_labels, db_labels, config)


def score_codes(
    query_codes: dict[str, np.ndarray],
    db_codes: dict[str, np.ndarray],
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    config: ml_collections.ConfigDict,
) -> Evaluation:
    """mAP@all, precision@k, radius-2 precision and PR curves of `{"K": int8 [N, K]}` codes."""
    results = {
        "dataset": config.data.name,
        "bits": [int(k) for k in config.bits],
        "mAP": {},
        "precision_at_k": {},
        "num_query": len(query_labels),
        "num_database": len(db_labels),
    }
    extra = {"tie_break": config.eval.tie_break, "precision_radius_2": {}, "pr_curve": {}}
    for k in map(str, config.bits):
        scored = (query_codes[k], db_codes[k], query_labels, db_labels)
        results["mAP"][k] = float(mean_average_precision(*scored, tie_break=config.eval.tie_break))
        results["precision_at_k"][k] = {
            str(n): float(precision_at_k(*scored, n)) for n in config.eval.precision_at_k
        }
        extra["precision_radius_2"][k] = float(precision_within_radius(*scored, radius=2))
        precision, recall = precision_recall_curve(*scored)
        extra["pr_curve"][k] = {"precision": precision.tolist(), "recall": recall.tolist()}
    return Evaluation(results, extra, query_codes, db_codes, query_labels, db_labels)


def evaluate_adapted(
    model,
    variables: dict,
    query: Any,
    database: Any,
    config: ml_collections.ConfigDict,
    mesh,
) -> Evaluation:
    """Like `evaluate`, with codes fitted to the database (`fdh_jax.search.adaptation`): per
    length, a PCA-ITQ fitted on the database's transfer features (no labels) hashes both splits."""
    adaptation.check_collection_size(len(database), max(int(k) for k in config.bits))
    weight = adaptation.descriptor_weight(config)
    query_features, db_features = (
        adaptation.transfer_features(*transfer_outputs(model, variables, s, config, mesh), weight)
        for s in (query, database)
    )
    query_codes, db_codes = {}, {}
    for k in config.bits:
        fitted = adaptation.fit_pca_itq(db_features, int(k), seed=0)
        query_codes[str(k)], db_codes[str(k)] = fitted(query_features), fitted(db_features)
    labels = (np.asarray(s.labels, np.int32) for s in (query, database))
    return score_codes(query_codes, db_codes, *labels, config)


def evaluate_and_report(
    model,
    variables: dict,
    query: Any,
    database: Any,
    config: ml_collections.ConfigDict,
    mesh,
    output_dir: Path,
    *,
    steps: int,
    train_seconds: float,
    extra_results: dict | None = None,
    inputs: tuple[Any, Any] | None = None,
    adapt: bool = False,
) -> dict:
    """Evaluates, then (process 0) writes `results.json`, `retrieval_metrics.json`, the PR
    curves and the gallery into `output_dir` and prints the table. Returns the results.

    `inputs`: `(query, database)` sources to encode instead of the image sources (the cached
    stage maps of a frozen backbone); the figures still show the images. `adapt`: score codes
    fitted to the database (`evaluate_adapted`) instead of the hash heads' codes.
    """
    query_inputs, database_inputs = inputs if inputs is not None else (query, database)
    scorer = evaluate_adapted if adapt else evaluate
    evaluation = scorer(model, variables, query_inputs, database_inputs, config, mesh)
    results = evaluation.results | {"train_seconds": round(train_seconds, 3), "steps": steps}
    results |= extra_results or {}
    if jax.process_index() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_results(output_dir, results)
        write_extra_metrics(output_dir, evaluation)
        write_figures(output_dir, evaluation, query, database)
        print(format_table(results), flush=True)
        print(f"Wrote {output_dir / 'results.json'}, pr_curves.png and gallery.html.", flush=True)
    return results
