"""Retrieval among classes never seen in training: cub100 split by species, 50 / 50.

  python benchmarks/unseen_classes.py                       # build the split, print the commands
  python benchmarks/unseen_classes.py --run --seeds=0,1,2   # and train, evaluate, run baselines
  python benchmarks/unseen_classes.py --run -- --config.train.num_steps=800  # + main flags

The species of a folder dataset (default: cub100) are sorted by name; the first `--seen` form
the *seen* dataset, the others the *unseen* one. Both are folder datasets under `--out` made of
symbolic links to the original files (nothing is copied), each with a `split.csv` that keeps
the original train (database) / test (query) split of every image.

With `--run` it then, for each seed:
1. trains the README's real-photo recipe (`configs/frozen_mobilenet_v2.py`, plus any flags given
   after `--`) on the seen species, `--workdir=OUT/workdir_seed<s>` (a finished seed is reused);
2. scores that model on the unseen species with `--mode=eval --eval_data=OUT/unseen`: the
   unseen database is hashed and ranked for the unseen queries;
3. and with `--adapt`: codes fitted to the unseen database without its labels
   (`fdh_jax/search/adaptation.py`, PCA-ITQ on the model's foreground-pooled C5 and descriptor);
and fits the linear baselines of `feature_baselines.py` on pooled C5 features of the same frozen
backbone: LSH (seeded random hyperplanes through the unseen database's mean), PCA-ITQ and
LDA-ITQ fitted on the *seen* database and applied to the unseen species
(the same information as the model had), and PCA-ITQ fitted on the unseen database itself
(unsupervised, so it may see the collection it indexes). It prints one table of mAP@all x100,
the model's row as mean +- std over the seeds.
"""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from feature_baselines import SHARED, cached_features, hash_codes
from seeds import markdown_row

from fdh_jax.data.sources import make_source
from fdh_jax.evaluation.metrics import mean_average_precision

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


def baselines(seen: Path, unseen: Path, bits: list[int], cache_dir: str) -> dict:
    """mAP x100 of the linear hashes on the unseen species, per method and code length."""
    args = argparse.Namespace(
        backbone="mobilenet_v2",
        weights=str(SHARED / "weights" / "mobilenet_v2_1.0_224_ptq.tflite"),
        image_size=224,
        batch=32,
        cache_dir=cache_dir,
    )
    sources = {
        (name, split): make_source("folder", str(root), split)
        for name, root in (("seen", seen), ("unseen", unseen))
        for split in ("train", "test")
    }
    features = {key: cached_features(s, args).astype(np.float64) for key, s in sources.items()}
    query, query_labels = features["unseen", "test"], sources["unseen", "test"].labels
    database, database_labels = features["unseen", "train"], sources["unseen", "train"].labels
    table = {}
    fits = {
        "LSH centred on the unseen database": ("LSH", "unseen"),
        "PCA-ITQ fitted on the seen species": ("PCA-ITQ", "seen"),
        "LDA-ITQ fitted on the seen species": ("LDA-ITQ", "seen"),
        "PCA-ITQ fitted on the unseen database": ("PCA-ITQ", "unseen"),
    }
    for label, (method, fitted_on) in fits.items():
        fit, fit_labels = features[fitted_on, "train"], sources[fitted_on, "train"].labels
        for k in bits:
            # hash_codes fits on its first argument and applies the fit to its third.
            _, unseen_db_codes = hash_codes(method, fit, fit_labels, database, k, seed=0)
            _, query_codes = hash_codes(method, fit, fit_labels, query, k, seed=0)
            table[label, k] = 100 * float(
                mean_average_precision(query_codes, unseen_db_codes, query_labels, database_labels)
            )
    return table


def _commands(seen: Path, unseen: Path, workdir: Path, seed: int, flags: list[str]):
    """The `fdh_jax.main` flags that train one seed on the seen species, and that score it on
    the unseen ones."""
    train = [*RECIPE, *flags, f"--config.seed={seed}", f"--workdir={workdir}"]
    train.append(f"--config.data.root={seen}")
    return train, [f"--workdir={workdir}", "--mode=eval", f"--eval_data={unseen}"]


def _train_and_score(seen: Path, unseen: Path, workdir: Path, seed: int, flags: list[str]):
    """Trains one seed on the seen species (unless done) and scores it on the unseen ones;
    returns `(seen results, unseen results, unseen results with --adapt)` as read from the
    results.json files."""
    unseen_file = workdir / "eval" / "unseen" / "results.json"
    adapted_file = workdir / "eval" / "unseen_adapted" / "results.json"
    train, evaluate = _commands(seen, unseen, workdir, seed, flags)
    if not (workdir / "results.json").is_file():
        _main(*train)
    if not unseen_file.is_file():
        _main(*evaluate)
    if not adapted_file.is_file():
        _main(*evaluate, "--adapt")
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
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
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
    if not args.run:
        for seed in seeds:
            for command in _commands(seen, unseen, out / f"workdir_seed{seed}", seed, flags):
                print("python -m fdh_jax.main " + " ".join(command))
        return
    start = time.perf_counter()
    runs = [_train_and_score(seen, unseen, out / f"workdir_seed{s}", s, flags) for s in seeds]
    unseen_results = runs[0][1]
    bits = [str(k) for k in unseen_results["bits"]]
    table = baselines(seen, unseen, [int(k) for k in bits], args.cache_dir)
    print(
        f"\nUnseen species ({unseen_results['num_query']} queries, "
        f"{unseen_results['num_database']} database images), mAP@all x100"
    )
    print("| method | " + " | ".join(f"{k} bits" for k in bits) + " |")
    print("|---|" + "---|" * len(bits))
    for label in dict.fromkeys(key for key, _ in table):
        print(f"| {label} | " + " | ".join(f"{table[label, int(k)]:.2f}" for k in bits) + " |")
    name = f"FDH-MFE trained on the seen species, seeds {args.seeds}"
    print(markdown_row(name, [r["mAP"] for _, r, _ in runs], bits))
    adapted = f"FDH-MFE, codes fitted to the unseen database (--adapt), seeds {args.seeds}"
    print(markdown_row(adapted, [r["mAP"] for _, _, r in runs], bits))
    seen_name = "(the same models on the seen species' queries)"
    print(markdown_row(seen_name, [r["mAP"] for r, _, _ in runs], bits))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
