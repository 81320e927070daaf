"""Choosing the checkpoint to report without looking at the query split.

With `eval.validation_fraction > 0` a seeded share of the database split is held out of training:
of each class's images (`eval.validation_by=images`, `fdh_jax.data.validation_split`; the held-out
images query the rest of the database) or whole classes (`classes`,
`fdh_jax.data.class_validation_split`; half of each held-out class's images query the other
half, retrieval among classes never trained on). It is scored every `eval.every` steps and at
the last step. `eval.select=last` reports the final checkpoint,
`eval.select=best` the one with the best mean validation mAP over the code lengths (ties: the
later step; Orbax keeps it). `results.json` says which step was chosen and why
(docs/design.md, "Contracts").
"""

from typing import Any

import ml_collections
import numpy as np

from fdh_jax.config_checks import ConfigError
from fdh_jax.data import class_validation_split, validation_split
from fdh_jax.data.decode import SubsetSource
from fdh_jax.encoding import encode_source
from fdh_jax.evaluation.metrics import mean_average_precision
from fdh_jax.training.step import state_variables


def validation_sources(config: ml_collections.ConfigDict, database: Any) -> tuple[Any, Any]:
    """`(training part, validation)` of the database inputs; `validation` is `(queries,
    database)` for scoring, or None when `eval.validation_fraction` is 0. By images the queries
    are the held-out images and the database the training part; by classes both come from the
    held-out classes. The query split is never touched."""
    fraction, seed = config.eval.validation_fraction, config.eval.validation_seed
    if fraction <= 0:
        return database, None
    by_classes = config.eval.validation_by == "classes"
    if by_classes:
        train, queries, held_database = class_validation_split(database.labels, fraction, seed)
        nothing = (
            f"{fraction} of the {np.unique(database.labels).size} classes holds out no class "
            "with two or more images (at least one class stays for training): raise it"
        )
    else:
        train, queries = validation_split(database.labels, fraction, seed)
        nothing = (
            f"{fraction} holds out no image of the {len(database)} database images (each "
            "class keeps at least one for training): raise it or set 0"
        )
    if queries.size == 0:
        raise ConfigError("eval.validation_fraction", nothing)
    training = SubsetSource(database, train)
    scored_against = SubsetSource(database, held_database) if by_classes else training
    return training, (SubsetSource(database, queries), scored_against)


def validation_scores(model, state: Any, validation: tuple[Any, Any], config, mesh) -> dict:
    """mAP@all per code length of the validation queries against the validation database
    (`validation_sources`), and their mean over the code lengths (`"mean"`: what
    `eval.select=best` ranks)."""
    variables = state_variables(state)
    queries, database = validation
    query_codes, query_labels = encode_source(model, variables, queries, config, mesh)
    db_codes, db_labels = encode_source(model, variables, database, config, mesh)
    scores = {
        k: float(
            mean_average_precision(
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


class Selection:
    """The validation scores seen so far: `latest` and `best` (`{"step", "mAP"}` or None), as
    stored in a checkpoint's `progress` so that a resumed run continues the same choice."""

    def __init__(self, config: ml_collections.ConfigDict, progress: dict):
        self.rule = config.eval.select
        self.latest = progress.get("validation")
        self.best = progress.get("best")

    def record(self, step: int, scores: dict) -> None:
        """Scores of `step`; the best so far is replaced on ties (the later step wins)."""
        self.latest = {"step": step, "mAP": scores}
        if self.best is None or scores["mean"] >= self.best["mAP"]["mean"]:
            self.best = self.latest

    def progress(self) -> dict:
        """The part of a checkpoint's `progress` record that this selection needs."""
        return {"validation": self.latest, "best": self.best}

    def chosen(self, validation: tuple[Any, Any], final_step: int) -> dict:
        """`results.json`'s `"selected"`: the step to report, the rule and its scores."""
        best = self.rule == "best"
        scored = self.best if best else self.latest
        return {
            "rule": "best validation mAP" if best else "last step",
            "step": int(scored["step"]) if best else final_step,
            "validation_mAP": scored["mAP"],
            "validation_queries": len(validation[0]),
            "validation_database": len(validation[1]),
        }
