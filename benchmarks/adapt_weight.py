"""Choose `eval.adapt_descriptor_weight` on species held out of training (never the query split).

  python benchmarks/adapt_weight.py --workdir=W [--weights=0,0.1,0.2,0.3,0.5,1]

`W` is a run trained with `--config.eval.validation_by=classes` (e.g. `--config.eval.
validation_fraction=0.3`, `--config.eval.select=last`): a seeded share of its database's classes
was never trained on, and half of each such class's images are validation queries, the other
half the validation database (`fdh_jax.data.class_validation_split`). For every weight `w` this
fits the collection codes of `fdh_jax.search.adaptation` (PCA-ITQ on `[unit(pooled C5), w *
unit(descriptor)]`) on the held-out database half, without labels, and prints mAP@all x100 of
the held-out queries per code length and the mean over lengths; the hash heads' own codes on
the same split are the first row.
"""

import argparse
import time

import numpy as np

from fdh_jax.data import class_validation_split, load_splits
from fdh_jax.data.decode import SubsetSource
from fdh_jax.encoding import encode_source, transfer_outputs
from fdh_jax.evaluation.evaluate import score_codes
from fdh_jax.evaluation.metrics import mean_average_precision
from fdh_jax.search import adaptation
from fdh_jax.serving.workdir_encoder import restore_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--weights", default="0,0.1,0.2,0.3,0.5,1")
    parser.add_argument("--bits", default=None, help="code lengths (default: the trained ones)")
    parser.add_argument("--step", type=int, default=None)
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]

    start = time.perf_counter()
    encoder = restore_encoder(args.workdir, args.step)
    config = encoder.config
    if config.eval.validation_by != "classes" or config.eval.validation_fraction <= 0:
        raise SystemExit(
            f"{args.workdir} was trained with eval.validation_by={config.eval.validation_by}, "
            f"validation_fraction={config.eval.validation_fraction}: the choice needs classes "
            "held out of training (--config.eval.validation_by=classes)"
        )
    database = load_splits(config, ("train",))["train"]
    _, query_ids, db_ids = class_validation_split(
        database.labels, config.eval.validation_fraction, config.eval.validation_seed
    )
    query, held = SubsetSource(database, query_ids), SubsetSource(database, db_ids)
    query_labels = np.asarray(database.labels)[query_ids]
    db_labels = np.asarray(database.labels)[db_ids]
    print(
        f"{args.workdir} (step {encoder.step}): {np.unique(db_labels).size} held-out classes, "
        f"{len(query_ids)} queries, {len(db_ids)} database images"
    )
    outputs = {
        name: transfer_outputs(encoder.model, encoder.variables, s, config, encoder.mesh)
        for name, s in (("query", query), ("database", held))
    }
    bits = [int(k) for k in (args.bits.split(",") if args.bits else config.bits)]
    rows = {}
    heads = score_codes(
        *(
            encode_source(encoder.model, encoder.variables, s, config, encoder.mesh)[0]
            for s in (query, held)
        ),
        query_labels,
        db_labels,
        config,
    )
    rows["hash heads"] = [100 * heads.results["mAP"].get(str(k), np.nan) for k in bits]
    for weight in weights:
        query_features, db_features = (
            adaptation.transfer_features(*outputs[name], weight) for name in ("query", "database")
        )
        row = []
        for k in bits:
            fitted = adaptation.fit_pca_itq(db_features, k, seed=0)
            score = mean_average_precision(
                fitted(query_features), fitted(db_features), query_labels, db_labels
            )
            row.append(100 * float(score))
        rows[f"adapted, descriptor weight {weight:g}"] = row
    print("| codes | " + " | ".join(f"{k} bits" for k in bits) + " | mean |")
    print("|---|" + "---|" * (len(bits) + 1))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {np.mean(row):.2f} |")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
