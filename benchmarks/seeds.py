"""Runs one config over several seeds and prints mean +- std of mAP@all per code length.

  python benchmarks/seeds.py --seeds=0,1,2 --root=/tmp/seeds -- \
      --config=configs/frozen_mobilenet_v2.py --config.data.root=DIR \
      --config.model.pretrained=FILE

Everything after `--` goes to `python -m fdh_jax.main` unchanged; each seed trains in
`ROOT/seed_<s>` with `--config.seed=<s>`; an existing workdir is resumed (a finished seed only
evaluates again, refitting its codes first if the config's `eval.fitted_code*` settings
changed, so its `results.json` always scores the current config's codes). Runs share the
feature cache, so only the first extracts the backbone's maps. The table has the query-split
mAP (what docs/results.md reports) and, when the config holds out a validation split, the
validation mAP of the checkpoint each run selected (of its fitted codes too, with
`eval.fitted_codes`): only validation may be used to choose between configs.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def markdown_row(name: str, values: list[dict], bits: list[str]) -> str:
    cells = []
    for k in bits:
        column = 100 * np.array([v[k] for v in values])
        spread = f" +- {column.std(ddof=1):.2f}" if len(column) > 1 else ""
        cells.append(f"{column.mean():.2f}{spread}")
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--root", required=True, help="one workdir per seed is made under it")
    parser.add_argument("main_args", nargs=argparse.REMAINDER, help="-- then fdh_jax.main flags")
    args = parser.parse_args()
    main_args = [a for a in args.main_args if a != "--"]
    if not any(a.startswith("--config=") for a in main_args):
        parser.error("give the run's flags after --, at least --config=FILE")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    root = Path(args.root)
    results = []
    for seed in seeds:
        workdir = root / f"seed_{seed}"
        command = [sys.executable, "-m", "fdh_jax.main", f"--workdir={workdir}"]
        command += [*main_args, f"--config.seed={seed}"]
        print(f"seed {seed}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            sys.exit(f"seed {seed} failed (workdir {workdir}): rerun to resume it")
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
        results.append(json.loads((workdir / "results.json").read_text()))
    bits = [str(k) for k in results[0]["bits"]]
    print(f"\n{len(seeds)} seed(s) ({', '.join(map(str, seeds))}), mAP@all x100, mean +- std:")
    print("| split | " + " | ".join(f"{k} bits" for k in bits) + " |")
    print("|---|" + "---|" * len(bits))
    print(markdown_row("query (test)", [r["mAP"] for r in results], bits))
    selected = [r.get("selected") for r in results]
    if all(selected):
        print(markdown_row("validation (selected)", [s["validation_mAP"] for s in selected], bits))
        steps = ", ".join(str(s["step"]) for s in selected)
        print(f"selected steps: {steps} ({selected[0]['rule']})")
    fitted = [r.get("fitted_codes") for r in results]
    if all(fitted):
        weights = [f["weight"] for f in fitted]
        print(f"fitted codes' weights: {', '.join(map(str, weights))} (None: the heads' codes)")
        if None not in weights:
            rows = [f["validation_mAP"][f"w={w:g}"] for f, w in zip(fitted, weights, strict=True)]
            rows = [dict(zip(bits, row, strict=True)) for row in rows]
            print(markdown_row("validation, fitted codes", rows, bits))


if __name__ == "__main__":
    main()
