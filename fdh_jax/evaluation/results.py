"""The files and the table an evaluation leaves: `results.json`, `retrieval_metrics.json`.

`results.json` is a contract (docs/design.md, "Contracts"); both files are written atomically.
"""

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fdh_jax.common.atomic_files import write_text_atomically


class Evaluation(NamedTuple):
    """Scores plus what they were computed from (for figures and index files)."""

    results: dict  # the results.json content (docs/design.md, "Contracts")
    extra: dict  # precision within Hamming radius 2 and PR curves, per code length
    query_codes: dict[str, np.ndarray]  # {"K": int8 [Q, K]}
    db_codes: dict[str, np.ndarray]  # {"K": int8 [N, K]}
    query_labels: np.ndarray  # int32 [Q]
    db_labels: np.ndarray  # int32 [N]


def write_extra_metrics(workdir: Path, evaluation: Evaluation) -> Path:
    """Writes `retrieval_metrics.json`: radius-2 precision and PR curves per code length."""
    path = Path(workdir) / "retrieval_metrics.json"
    return write_text_atomically(path, json.dumps(evaluation.extra, indent=2) + "\n")


def write_results(workdir: Path, results: dict) -> Path:
    """Writes `workdir/results.json` atomically (no half-written file on a crash)."""
    path = Path(workdir) / "results.json"
    return write_text_atomically(path, json.dumps(results, indent=2) + "\n")


def format_table(results: dict) -> str:
    """The mAP / precision@k table printed after evaluation."""
    ks = list(next(iter(results["precision_at_k"].values()), {}))
    header = ["bits", "mAP@all"] + [f"P@{n}" for n in ks]
    lines = [
        f"{results['dataset']}: {results['num_query']} queries, "
        f"{results['num_database']} database items",
        " | ".join(f"{h:>8}" for h in header),
    ]
    for k in map(str, results["bits"]):
        row = [k, f"{results['mAP'][k]:.4f}"] + [
            f"{results['precision_at_k'][k][n]:.4f}" for n in ks
        ]
        lines.append(" | ".join(f"{c:>8}" for c in row))
    return "\n".join(lines)
