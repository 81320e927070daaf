"""Retrieval among classes never seen in training: cub100 split by species, 50 / 50.

  python benchmarks/unseen_classes.py                       # build the split, print the commands
  python benchmarks/unseen_classes.py --baselines           # the baselines only (no training)
  python benchmarks/unseen_classes.py --run --seeds=0,1,2   # and train, evaluate, run baselines
  python benchmarks/unseen_classes.py --run -- --config.train.num_steps=800  # + main flags

The species of a folder dataset (default: cub100) are sorted by name; the first `--seen` form
the *seen* dataset, the others the *unseen* one. Both are folder datasets under `--out` made of
symbolic links to the original files (nothing is copied), each with a `split.csv` that keeps
the original train (database) / test (query) split of every image.

With `--run` it then, for each seed:
1. trains the README's real-photo recipe (`configs/frozen_mobilenet_v2.py`, plus any flags given
   after `--`) on the seen species, `--workdir=OUT/workdir_seed<s>`; a finished seed is reused
   only if its recorded `config.json` is the config this command trains (else it stops and
   names the fields that differ), and resumed (no training: its codes are fitted again and it
   is evaluated) if its results were scored with other `eval.fitted_code*` settings;
2. scores that model's own codes on the unseen species with `--mode=eval
   --eval_data=OUT/unseen`, no refit: the unseen database is hashed and ranked for the unseen
   queries (with the recipe's `eval.fitted_codes`, the codes fitted on the seen species'
   training images, `fdh_jax/training/code_fitting.py`);
3. and with `--adapt`: codes fitted to the unseen database without its labels
   (`fdh_jax/search/adaptation.py`, PCA-ITQ on the model's foreground-pooled C5 and descriptor);
   an evaluation recorded for another checkpoint, folder or descriptor weight is run again.

With `--run` or `--baselines` it fits the linear baselines of `feature_baselines.py` on the C5
features of the same frozen backbone, on every feature variant there (centre crop or photo +
mirror, plain or mask pooling, raw or L2): LSH (seeded random hyperplanes through the unseen
database's mean), PCA-ITQ and LDA-ITQ fitted on the *seen* database and applied to the unseen
species (the same information as the model had), and PCA-ITQ fitted on the unseen database
itself (unsupervised, so it may see the collection it indexes, as `--adapt` does). PCA-ITQ on
the unseen database with photo + mirror, mask pooling and L2 is `--adapt` at descriptor weight
0: no trained parameter. It prints the grid, the old rows beside the rows on the model's terms,
the cosine (continuous) mAP of the pooled features, and with `--run` the model's rows as mean
+- std over the seeds (mAP@all x100).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import feature_baselines as fb
import numpy as np
from feature_baselines import SHARED
from ml_collections import ConfigDict
from seeds import markdown_row

from fdh_jax.data.sources import make_source
from fdh_jax.search.adaptation import adapted_codes_label, descriptor_weight
from fdh_jax.training import code_fitting
from fdh_jax.training.workdir import config_differences

REPO = Path(__file__).resolve().parents[1]
RECIPE = [  # the README's real-photo command, less --workdir and --config.data.root
    "--config=configs/frozen_mobilenet_v2.py",
    f"--config.model.pretrained={SHARED / 'weights' / 'mobilenet_v2_1.0_224_ptq.tflite'}",
]


def split_by_species(root: Path, out: Path, seen: int) -> tuple[Path, Path]:
    """Writes `out/seen` and `out/unseen` (links + split.csv); returns both roots."""
    with open(root / "split.csv", newline="") as f:
        rows = [(row["path"], row["split"]) for row in csv.DictReader(f)]
    species = sorted({Path(path).parent.name for path, _ in rows})
    if not 0 < seen < len(species):
        raise SystemExit(f"--seen must be in [1, {len(species) - 1}], got {seen}")
    groups = {"seen": set(species[:seen]), "unseen": set(species[seen:])}
    roots = {}
    for name, members in groups.items():
        subset = out / name
        listed = [(path, split) for path, split in rows if Path(path).parent.name in members]
        for path, _ in listed:
            link = subset / path
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to((root / path).resolve())
        with open(subset / "split.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "split"])
            writer.writerows(listed)
        roots[name] = subset
        print(f"{name}: {len(members)} species, {len(listed)} images in {subset}")
    return roots["seen"], roots["unseen"]


def _main(*flags: str) -> None:
    command = [sys.executable, "-m", "fdh_jax.main", *flags]
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def baselines(data: Path, seen: int, bits: list[int], args: argparse.Namespace) -> dict:
    """mAP x100 of the linear hashes on the unseen species, per fit, feature variant and code
    length (`feature_baselines.score_variants`), and the cosine mAP of the pooled features. The
    features are those of the whole dataset (`data`: the cache of feature_baselines.py's run)."""
    pools, labels, species = {}, {}, {}
    for split in ("train", "test"):
        source = make_source("folder", str(data), split)
        pools[split], labels[split] = fb.cached_pools(source, args), np.asarray(source.labels)
        species[split] = np.array([Path(path).parent.name for path in source.paths])
    seen_species = sorted(set(species["train"]))[:seen]
    part = {
        (group, split): np.isin(species[split], seen_species) == (group == "seen")
        for group in ("seen", "unseen")
        for split in ("train", "test")
    }

    def subset(group: str, split: str):
        return pools[split][part[group, split]], labels[split][part[group, split]]

    query, query_labels = subset("unseen", "test")
    database, database_labels = subset("unseen", "train")
    fits = {
        "LSH centred on the unseen database": ("LSH", *subset("unseen", "train")),
        "PCA-ITQ fitted on the seen species": ("PCA-ITQ", *subset("seen", "train")),
        "LDA-ITQ fitted on the seen species": ("LDA-ITQ", *subset("seen", "train")),
        "PCA-ITQ fitted on the unseen database": ("PCA-ITQ", *subset("unseen", "train")),
    }
    print(
        f"\nUnseen species ({len(query)} queries, {len(database)} database images), mAP@all "
        "x100 of the linear hashes on C5 features of the frozen backbone"
    )
    table = fb.score_variants(fits, query, query_labels, database, database_labels, bits, args)
    fb.print_tables(table, bits, args.flip_average)
    weight_zero = fb.Variant(mirror=args.flip_average, pooling="mask", l2=True)
    cells = " | ".join(
        f"{v:.2f}" for v in table["PCA-ITQ fitted on the unseen database", weight_zero]
    )
    name = f"PCA-ITQ fitted on the unseen database, {weight_zero.name}"
    print(f"| `--adapt` at descriptor weight 0 (= {name}) | {cells} |")
    print("\nCosine (continuous) mAP@all x100 of the pooled features on the unseen species:")
    for mirror in (False, True):
        for pooling in fb.POOLINGS:
            variant = fb.Variant(mirror, pooling, l2=True)
            score = fb.cosine_map(
                fb.variant_features(query, variant),
                fb.variant_features(database, variant),
                query_labels,
                database_labels,
            )
            print(f"  {variant.name.removesuffix(', L2')}: {100 * score:.2f}")
    return table


def _commands(seen: Path, unseen: Path, workdir: Path, seed: int, flags: list[str]):
    """The `fdh_jax.main` flags that train one seed on the seen species, and that score it on
    the unseen ones."""
    train = [*RECIPE, *flags, f"--config.seed={seed}", f"--workdir={workdir}"]
    train.append(f"--config.data.root={seen}")
    return train, [f"--workdir={workdir}", "--mode=eval", f"--eval_data={unseen}"]


IGNORED_FIELDS = {"train.keep_checkpoints", "data.feature_cache"}  # no effect on the model
# Applied after training: a finished run given other values is resumed, which refits its codes
# and evaluates again (`fdh_jax.training.code_fitting`).
POST_TRAINING_FIELDS = {
    "eval.fitted_codes",
    "eval.fitted_code_weights",
    "eval.fitted_code_tolerance",
}
PATH_FIELDS = ("data.root", "model.pretrained")  # compared as absolute paths from REPO


def _config_dict(train_flags: list[str]) -> dict:
    """The config that `fdh_jax.main` builds from these flags, parsed the same way."""
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    argv = [
        f"--config={REPO / f[len('--config=') :]}" if f.startswith("--config=") else f
        for f in train_flags
        if f.startswith("--config")
    ]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=["", *argv]
    )
    values(["unseen_classes", *argv])
    return json.loads(values.config.to_json_best_effort())


def _normalised(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    for field in PATH_FIELDS:
        group, name = field.split(".")
        if config.get(group, {}).get(name):
            config[group][name] = os.path.abspath(os.path.join(REPO, config[group][name]))
    return config


def _added_at_default(field: str, recorded: dict, wanted: dict, defaults: dict) -> bool:
    """Whether `field` is missing from an older run's record and wanted at the library's default
    (`configs/default.py`): a field added since, whose default keeps the old behaviour."""
    missing, value, default = object(), wanted, defaults
    for name in field.split("."):
        recorded = recorded.get(name, missing) if isinstance(recorded, dict) else missing
        value = value.get(name, missing) if isinstance(value, dict) else missing
        default = default.get(name, missing) if isinstance(default, dict) else missing
    return recorded is missing and value is not missing and value == default


def check_recorded_config(workdir: Path, train_flags: list[str]) -> None:
    """Stops (one line) unless `workdir`'s recorded training config is the one `train_flags`
    would train: a finished run of another config must not be reused."""
    recorded = json.loads((workdir / "config.json").read_text())
    wanted = _config_dict(train_flags)
    defaults = _config_dict(["--config=configs/default.py"])
    differ = [
        field
        for field in config_differences(_normalised(recorded), _normalised(wanted))
        if field not in IGNORED_FIELDS | POST_TRAINING_FIELDS
        and not _added_at_default(field, recorded, wanted, defaults)
    ]
    if differ:
        raise SystemExit(
            f"{workdir} holds a run of another config (fields {', '.join(differ)} differ): "
            "remove it or use another --out"
        )


def _fit_is_stale(results: dict, train_flags: list[str]) -> bool:
    """Whether a finished run's `results.json` was scored with other codes than the config of
    `train_flags` fits at the end of training (then the run is resumed, which refits them)."""
    config = ConfigDict(_config_dict(train_flags))
    fitted = results.get("fitted_codes")
    if not config.eval.get("fitted_codes", False):
        return fitted is not None
    return fitted is None or fitted.get("settings") != code_fitting.settings(config)


def _codes_label(results: dict) -> str | None:
    """The `"codes"` that `--mode=eval` records for the codes of a run's `results.json`."""
    fitted = results.get("fitted_codes")
    if fitted is None or fitted.get("weight") is None:
        return None
    return code_fitting.fitted_codes_label(fitted)


def _stale_evaluation(path: Path, checkpoint_step: int, unseen: Path, codes=None) -> str | None:
    """Why the evaluation results at `path` do not belong to this model, folder and codes (or
    None)."""
    if not path.is_file():
        return "missing"
    results = json.loads(path.read_text())
    if results.get("checkpoint_step") != checkpoint_step:
        return f"of step {results.get('checkpoint_step')}, not {checkpoint_step}"
    if results.get("eval_data") != str(unseen.resolve()):
        return f"of {results.get('eval_data')}, not {unseen.resolve()}"
    if results.get("codes") != codes:
        return f"of codes {results.get('codes')!r}, not {codes!r}"
    return None


def _train_and_score(seen: Path, unseen: Path, workdir: Path, seed: int, flags: list[str]):
    """Trains one seed on the seen species (unless done with this config) and scores it on the
    unseen ones; returns `(seen results, unseen results, unseen results with --adapt)` as read
    from the results.json files."""
    unseen_file = workdir / "eval" / "unseen" / "results.json"
    adapted_file = workdir / "eval" / "unseen_adapted" / "results.json"
    train, evaluate = _commands(seen, unseen, workdir, seed, flags)
    if (workdir / "results.json").is_file():
        check_recorded_config(workdir, train)
        if _fit_is_stale(json.loads((workdir / "results.json").read_text()), train):
            print(f"{workdir}: codes fitted with other settings; resuming the run", flush=True)
            _main(*train)
    else:
        _main(*train)
    results = json.loads((workdir / "results.json").read_text())
    step = results["steps"]
    weight = descriptor_weight(json.loads((workdir / "config.json").read_text()))
    for path, extra, codes in (
        (unseen_file, [], _codes_label(results)),
        (adapted_file, ["--adapt"], adapted_codes_label(weight)),
    ):
        stale = _stale_evaluation(path, step, unseen, codes)
        if stale:
            if stale != "missing":
                print(f"{path}: results {stale}; evaluating again", flush=True)
            _main(*evaluate, *extra)
    return tuple(
        json.loads(path.read_text())
        for path in (workdir / "results.json", unseen_file, adapted_file)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "cub100"))
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "cub100_by_species"))
    parser.add_argument("--seen", type=int, default=50, help="species used for training")
    parser.add_argument("--run", action="store_true", help="train, evaluate and run baselines")
    parser.add_argument("--baselines", action="store_true", help="run the baselines only")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--bits", default="12,24,32,48", help="code lengths of the baselines")
    parser.add_argument(
        "--cache_dir", default=str(Path(tempfile.gettempdir()) / "fdh_feature_cache")
    )
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="-- then extra fdh_jax.main flags")
    args = parser.parse_args()
    flags = [a for a in args.flags if a != "--"]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not seeds:
        parser.error("--seeds names no seed")
    out = Path(args.out)
    seen, unseen = split_by_species(Path(args.data), out, args.seen)
    if not (args.run or args.baselines):
        for seed in seeds:
            for command in _commands(seen, unseen, out / f"workdir_seed{seed}", seed, flags):
                print("python -m fdh_jax.main " + " ".join(command))
        return
    start = time.perf_counter()
    runs = []
    if args.run:
        runs = [_train_and_score(seen, unseen, out / f"workdir_seed{s}", s, flags) for s in seeds]
    bits = [str(k) for k in runs[0][1]["bits"]] if runs else args.bits.split(",")
    # The baselines see the features the model's config evaluates with (views, mask, size).
    model_config = _config_dict([*RECIPE, *flags])
    features = argparse.Namespace(
        backbone=model_config["model"]["backbone"],
        weights=model_config["model"]["pretrained"],
        image_size=int(model_config["data"]["image_size"]),
        eval_resize=int(model_config["data"]["eval_resize"]),
        mask_temperature=float(model_config["model"]["mask_temperature"]),
        flip_average=bool(model_config["model"]["flip_average"]),
        batch=32,
        seed=0,
        tie_break="index",
        cache_dir=args.cache_dir,
    )
    baselines(Path(args.data), args.seen, [int(k) for k in bits], features)
    if runs:
        print(f"\nThe models, mAP@all x100 ({runs[0][1]['num_query']} unseen queries)")
        fitted = [seen.get("fitted_codes", {}).get("weight") for seen, _, _ in runs]
        codes = (
            f"its own codes, fitted on the training images (weights {', '.join(map(str, fitted))})"
            if any(w is not None for w in fitted)
            else "the hash heads' codes"
        )
        name = f"FDH-MFE trained on the seen species, {codes}, seeds {args.seeds}"
        print(markdown_row(name, [r["mAP"] for _, r, _ in runs], bits))
        adapted = f"FDH-MFE, codes fitted to the unseen database (--adapt), seeds {args.seeds}"
        print(markdown_row(adapted, [r["mAP"] for _, _, r in runs], bits))
        seen_name = "(the same models on the seen species' queries)"
        print(markdown_row(seen_name, [r["mAP"] for r, _, _ in runs], bits))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
