"""Codes fitted on the training images: each hash head's output blended with the pooled C5.

  python benchmarks/fitted_codes.py --held_out=CD0[,CD1,...] --validation=W0,W1,W2 \
      --unseen=ROOT [--cub100=C0,C1,C2 [--cub100_in_rule]] [--forms=head,descriptor]
  python benchmarks/fitted_codes.py --per_run=product --validation=W0,W1,W2 --unseen=ROOT \
      --cub100=C0,C1,C2

Issue 34 asks for the recipe's own codes (no refit on the new collection) to keep the geometry
of species never trained on. The heads' codes `sign(h_K)` are class-bound; PCA-ITQ of the
frozen features carries over but knows nothing of the classes. This script measures a code
between the two, fitted once on the *training* images without their labels: for each length K,
PCA-ITQ (`fdh_jax.search.adaptation.fit_pca_itq`) on `t_K = [unit(pooled C5), w * unit(h_K)]`
(form `head`) or on `[unit(pooled C5), w * unit(descriptor)]` (form `descriptor`, the
`--adapt` features), then `where((t_K - mean) P R >= 0, +1, -1)` for every photo, as the
heads' codes are. A small `w` leans on the generic C5, a large one on the heads.

`w` is chosen per code length on validation only, never on the unseen species or a test split:
- held-out classes: each `--held_out` run was trained with `--config.eval.validation_by=classes`
  (several runs: several `eval.validation_seed`s); each fit uses its run's training classes'
  images, and its held-out classes' queries search their database half; mean over the runs;
- trained classes: each `--validation` run's 10% image validation (`eval.validation_fraction`),
  searching the other 90% of the database, on which the fit is made; mean over the runs; with
  `--cub100_in_rule` the `--cub100` runs' image validation too, as a second group;
- rule: among the candidate weights whose validation mAP is at most `--tolerance` (0.5) below
  the heads' own codes at that length in every group, the one with the highest held-out mAP.
With `--per_run` (no `--held_out` needed) each run gets its own weights instead, chosen on its
image validation alone: `per_length`, per length the smallest weight that stays within the
tolerance of the heads' own codes (those if none does); `product`, the rule the product
applies at the end of training (`eval.fitted_codes`, `fdh_jax/training/code_fitting.py`): one
weight for all lengths, the smallest whose mean over the lengths stays within the tolerance.
Then, with the chosen weights, each `--validation` run (the seeds of `unseen_classes.py --run`,
trained on its seen half) is scored on the unseen species at `--unseen` (the database split
searched by the query split) and on its own test queries, and each `--cub100` run on its test
queries; heads' codes beside fitted codes, mean +- std over runs, mAP@all x100.

The model outputs are cached under `--cache` (one `.npz` per run, step, dataset and split).
"""

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np

from fdh_jax.data import class_validation_split, load_splits, validation_split
from fdh_jax.encoding import continuous_outputs
from fdh_jax.evaluation.metrics import mean_average_precision
from fdh_jax.search import adaptation
from fdh_jax.serving.workdir_encoder import restore_encoder
from fdh_jax.training import code_fitting

WEIGHTS = (0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)


class Run:
    """A workdir's encoder and its cached real-valued outputs per dataset split."""

    def __init__(self, workdir: str, cache: Path):
        self.workdir, self.cache = workdir, cache
        self.encoder = restore_encoder(workdir)
        self.config = self.encoder.config
        self.bits = [int(k) for k in self.config.bits]

    def outputs(self, split: str, root: str | None = None) -> dict[str, np.ndarray]:
        """`continuous_outputs` of `split` (of `root`, default the run's dataset) + `label`."""
        config = self.config.copy_and_resolve_references()
        config.unlock()
        if root is not None:
            config.data.root = root
        key = f"{Path(self.workdir).resolve()}|{self.encoder.step}|{config.data.root}|{split}"
        path = self.cache / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
        if path.is_file():
            return dict(np.load(path))
        start = time.perf_counter()
        source = load_splits(config, (split,))[split]
        enc = self.encoder
        out = continuous_outputs(enc.model, enc.variables, source, config, enc.mesh)
        out["label"] = np.asarray(source.labels)
        self.cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, **out)
        print(
            f"  encoded {split} of {config.data.root} ({len(source)} images) with "
            f"{self.workdir} in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        return out

    def score(self, query: dict, db: dict, fit: dict, weights: dict) -> dict[str, list[float]]:
        """mAP x100 per length of the heads' codes and of codes fitted on `fit` (one `(form,
        w)` per length in `weights`, or a list of them: one row each)."""
        tie = self.config.eval.tie_break

        def map_(q, d):
            return 100 * float(
                mean_average_precision(q, d, query["label"], db["label"], tie_break=tie)
            )

        rows = {
            "heads": [
                map_(adaptation.binarise(query[f"hash_{k}"]), adaptation.binarise(db[f"hash_{k}"]))
                for k in self.bits
            ]
        }
        for name, choice in weights.items():
            row = []
            for k in self.bits:
                if choice[k] is None:  # the heads' own codes at this length
                    row.append(rows["heads"][self.bits.index(k)])
                    continue
                form, w = choice[k]
                fitted = adaptation.fit_pca_itq(_features(fit, form, w, k), k, seed=0)
                row.append(
                    map_(fitted(_features(query, form, w, k)), fitted(_features(db, form, w, k)))
                )
            rows[name] = row
        return rows


def _features(outputs: dict, form: str, weight: float, bits: int) -> np.ndarray:
    other = outputs[f"hash_{bits}"] if form == "head" else outputs["descriptor"]
    return adaptation.transfer_features(outputs["pooled"], other, weight)


def _subset(outputs: dict, indices: np.ndarray) -> dict:
    return {name: value[indices] for name, value in outputs.items()}


def _line(name: str, values) -> str:
    values = np.asarray(values, np.float64)
    if values.ndim == 1:
        cells = [f"{v:6.2f}" for v in values]
        return f"{name:44s} " + " / ".join(cells) + f"   mean {values.mean():.2f}"
    mean, std = values.mean(0), values.std(0)
    cells = [f"{m:6.2f} +- {s:4.2f}" for m, s in zip(mean, std, strict=True)]
    return f"{name:44s} " + " / ".join(cells)


def _held_out_scores(run: Run, grid: dict) -> dict[str, list[float]]:
    """A class-disjoint run's held-out queries searching their database half, fitted on its
    training classes' images."""
    train = run.outputs("train")
    kept, queries, database = class_validation_split(
        train["label"], run.config.eval.validation_fraction, run.config.eval.validation_seed
    )
    return run.score(_subset(train, queries), _subset(train, database), _subset(train, kept), grid)


def _image_split(run: Run) -> tuple[dict, dict, dict]:
    """`(database, fit, validation)` outputs of a run: its whole database, the part it trained
    on (where codes are fitted) and its image validation queries."""
    train = run.outputs("train")
    kept, val = validation_split(
        train["label"], run.config.eval.validation_fraction, run.config.eval.validation_seed
    )
    return train, _subset(train, kept), _subset(train, val)


def _validation_scores(run: Run, grid: dict) -> dict[str, list[float]]:
    """A run's image validation queries searching the rest of its database, fitted on it."""
    _, fit, val = _image_split(run)
    return run.score(val, fit, fit, grid)


def _grid(forms: list[str], bits: list[int]) -> dict[str, dict]:
    """The candidate `(form, w)` per length, one row per form and weight."""
    return {f"{form} w={w}": {k: (form, w) for k in bits} for form in forms for w in WEIGHTS}


def _mean(rows: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.mean([r[name] for r in rows], axis=0) for name in rows[0]}


def choose(held: list[Run], groups: dict[str, list[Run]], forms: list[str], tolerance: float):
    """Per length, the `(form, w)` of the rule in the module docstring; prints the grid."""
    bits = held[0].bits
    grid = _grid(forms, bits)
    held_mean = _mean([_held_out_scores(run, grid) for run in held])
    val_means = {
        g: _mean([_validation_scores(r, grid) for r in runs]) for g, runs in groups.items()
    }
    print(
        f"\nChoice grid, mAP@all x100 at {bits} bits: held-out classes (mean of {len(held)} "
        f"class-disjoint runs) | image validation (mean of each group's runs)"
    )
    for name in held_mean:
        print(_line(f"{name} held-out", held_mean[name]))
        for group, val in val_means.items():
            print(_line(f"{name} validation, {group}", val[name]))
    chosen = {}
    for i, k in enumerate(bits):
        allowed = [
            n for n in grid if all(v[n][i] >= v["heads"][i] - tolerance for v in val_means.values())
        ]
        if not allowed:
            raise SystemExit(f"no weight keeps {k}-bit validation within {tolerance} of the heads'")
        best = max(allowed, key=lambda n: held_mean[n][i])
        chosen[k] = grid[best][k]
        print(
            f"  {k} bits: {best} (held-out {held_mean[best][i]:.2f} against the heads' "
            f"{held_mean['heads'][i]:.2f})"
        )
    return chosen


def per_run_choice(run: Run, forms: list[str], tolerance: float, rule: str) -> dict:
    """`--per_run=per_length`: per length, the smallest weight whose image validation of `run`
    itself is at most `tolerance` below the heads' own codes (None, the heads' codes, if none
    is). `--per_run=product`: the product's rule (`fdh_jax.training.code_fitting`), one weight
    for all lengths, the smallest within `tolerance` on the mean over the lengths."""
    if rule == "product":
        _, fit, val = _image_split(run)
        tie = run.config.eval.tie_break
        table, _ = code_fitting.validation_table(fit, val, fit, run.bits, WEIGHTS, tie)
        weight = code_fitting.choose_weight(table, tolerance)
        chosen = {k: None if weight is None else ("head", weight) for k in run.bits}
        print(f"  {run.workdir}: " + (f"w={weight:g}" if weight is not None else "heads"))
        return chosen
    grid = _grid(forms, run.bits)
    val = _validation_scores(run, grid)
    chosen = {}
    for i, k in enumerate(run.bits):
        allowed = [n for n in grid if val[n][i] >= val["heads"][i] - tolerance]
        chosen[k] = grid[allowed[0]][k] if allowed else None
    print(
        f"  {run.workdir}: "
        + ", ".join(f"{k}: {c[1] if c else 'heads'}" for k, c in chosen.items())
    )
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--held_out", default="", help="comma-separated runs with eval.validation_by=classes"
    )
    parser.add_argument("--validation", required=True, help="comma-separated runs (seeds)")
    parser.add_argument("--unseen", default=None, help="the unseen species' dataset root")
    parser.add_argument("--cub100", default=None, help="comma-separated cub100 runs")
    parser.add_argument("--forms", default="head")
    parser.add_argument("--tolerance", type=float, default=0.5)
    parser.add_argument(
        "--cub100_in_rule",
        action="store_true",
        help="the --cub100 runs' image validation constrains the choice too",
    )
    parser.add_argument(
        "--per_run",
        choices=("per_length", "product"),
        default=None,
        help="instead: each run's own weights, the smallest its image validation allows, per "
        "length or (product) one for all lengths",
    )
    parser.add_argument("--cache", default="/tmp/fdh_fitted_codes")
    args = parser.parse_args()
    start, cache = time.perf_counter(), Path(args.cache)
    held = [Run(w, cache) for w in args.held_out.split(",") if w]
    if not held and not args.per_run:
        raise SystemExit("--held_out: the rule needs class-disjoint runs (or use --per_run)")
    for run in held:
        if run.config.eval.validation_by != "classes":
            raise SystemExit(f"{run.workdir}: not trained with --config.eval.validation_by=classes")
    validation = [Run(w, cache) for w in args.validation.split(",")]
    cub100 = [Run(w, cache) for w in args.cub100.split(",")] if args.cub100 else []
    groups = {"--validation": validation}
    if args.cub100_in_rule:
        groups["--cub100"] = cub100
    forms = args.forms.split(",")
    if args.per_run:
        print("\nWeights per run, chosen on its own image validation:")
        label = "fitted, each run's own weights"
        choices = {
            run: per_run_choice(run, forms, args.tolerance, args.per_run)
            for run in validation + cub100
        }
    else:
        chosen = choose(held, groups, forms, args.tolerance)
        label = "fitted (" + ", ".join(f"{k}: {f} w={w}" for k, (f, w) in chosen.items()) + ")"
        choices = {run: chosen for run in validation + cub100}
    tables = {}

    def add(title: str, run: Run, query: dict, database: dict, fit: dict) -> None:
        for name, row in run.score(query, database, fit, {"fitted": choices[run]}).items():
            tables.setdefault(f"{title}, {name}", []).append(row)

    for run in validation:
        train, fit, _ = _image_split(run)
        if args.unseen:
            unseen = (run.outputs("test", args.unseen), run.outputs("train", args.unseen))
            add("unseen species", run, *unseen, fit)
        add("seen species' test queries", run, run.outputs("test"), train, fit)
    for run in cub100:
        train, fit, _ = _image_split(run)
        add("cub100 test queries", run, run.outputs("test"), train, fit)
    print(f"\n{label}\nmAP@all x100 at {validation[0].bits} bits, mean +- std over runs:")
    for name, rows in tables.items():
        print(_line(f"{name} ({len(rows)})", rows))
        print(" " * 45 + "per run: " + "; ".join(" / ".join(f"{v:.2f}" for v in r) for r in rows))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
