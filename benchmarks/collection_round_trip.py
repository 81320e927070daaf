"""A collection's life on real photos, through the command line only, checked against a fresh index.

  python benchmarks/collection_round_trip.py --workdir=W --root=../shared/data/cub100

`W` is a model trained on cub100 (a training workdir or an export). With the database photos
(`split.csv`'s train split) in folders of links named `<species>/<file>`: creates a collection with
`--mode=add` from the first half of the species, adds the second half, removes every photo of one
species (`--mode=remove --ids=@FILE`: of the 10 queried species, the one whose query found most of
its own species before) and searches the collection again with the same query photos
(`--mode=search --collection`). Then encodes the same live photos in the same order into a fresh
`HashIndex` (`--mode=encode`) and searches it with the same queries (`--mode=search --index`).
Prints the time of each step and checks that the removed species never appears, and that both
searches rank the same photos at the same distances.
"""

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIT = re.compile(r"^\s+\d+\. d=\s*(\d+)\s+(\S+)")


def _cli(*args: str) -> str:
    began = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "fdh_jax.main", *args], cwd=REPO, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"fdh_jax {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    mode = next(a for a in args if a.startswith("--mode="))
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"{time.perf_counter() - began:6.1f} s  {mode}: {last[:110]}", flush=True)
    return result.stdout


def _link_folder(folder: Path, root: Path, paths: list[str]) -> None:
    """`folder/<species>/<file>` links to `root/images/<species>/<file>`: sorted listing order is
    the species' then the files' order."""
    for path in paths:
        link = folder / Path(path).relative_to("images")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((root / path).resolve())


def _ranked(stdout: str) -> list[list[tuple[int, str]]]:
    """`--mode=search` output -> per query [(distance, species/file), ...]."""
    queries = []
    for line in stdout.splitlines():
        if line.startswith("query: "):
            queries.append([])
        elif match := HIT.match(line):
            queries[-1].append((int(match.group(1)), "/".join(Path(match.group(2)).parts[-2:])))
    return queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a cub100 training workdir or export")
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "cub100"))
    parser.add_argument("--topk", type=int, default=50)
    args = parser.parse_args()
    root = Path(args.root).resolve()
    with open(root / "split.csv") as f:
        split = {row["path"]: row["split"] for row in csv.DictReader(f)}
    database = sorted(p for p, s in split.items() if s == "train")
    queries = sorted(p for p, s in split.items() if s == "test")
    species = sorted({Path(p).parts[1] for p in database})
    first_half = set(species[: len(species) // 2])
    print(
        f"load average: {os.getloadavg()[0]:.2f}; {len(database)} database photos of "
        f"{len(species)} species",
        flush=True,
    )
    picked = [next(p for p in queries if Path(p).parts[1] == s) for s in species[::10]]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        halves = {
            "first": [p for p in database if Path(p).parts[1] in first_half],
            "second": [p for p in database if Path(p).parts[1] not in first_half],
        }
        for name, paths in (*halves.items(), ("q", picked)):
            _link_folder(scratch / name, root, paths)
        collection = f"--collection={scratch / 'collection'}"
        _cli("--mode=add", collection, f"--images={scratch / 'first'}", f"--workdir={args.workdir}")
        _cli("--mode=add", collection, f"--images={scratch / 'second'}")
        query = f"--query={scratch / 'q'}"
        before = _ranked(_cli("--mode=search", collection, query, f"--topk={args.topk}"))
        # The species to remove: the queried one whose query found most of its own species.
        own = [sum(p.startswith(f"{Path(q).parts[1]}/") for _, p in hits) for q, hits in
               zip(picked, before, strict=True)]  # fmt: skip
        removed = Path(picked[own.index(max(own))]).parts[1]
        half = "first" if removed in first_half else "second"
        ids = [os.path.abspath(scratch / half / Path(p).relative_to("images"))
               for p in halves[half] if Path(p).parts[1] == removed]  # fmt: skip
        (scratch / "ids.txt").write_text("\n".join(ids))
        _cli("--mode=remove", collection, f"--ids=@{scratch / 'ids.txt'}")
        ours = _ranked(_cli("--mode=search", collection, query, f"--topk={args.topk}"))
        live = [p for p in database if Path(p).parts[1] != removed]  # in the collection's order
        _link_folder(scratch / "live", root, live)
        index = f"--index={scratch / 'fresh.npz'}"
        _cli("--mode=encode", f"--workdir={args.workdir}", f"--images={scratch / 'live'}", index)
        fresh = _ranked(
            _cli("--mode=search", f"--workdir={args.workdir}", index, query, f"--topk={args.topk}")
        )
    leaked = sum(path.startswith(f"{removed}/") for hits in ours for _, path in hits)
    same = ours == fresh and len(ours) == len(picked)
    print(
        f"removed {removed} ({len(ids)} photos), whose query's top {args.topk} held {max(own)} of "
        f"them before; {len(picked)} queries after the removal: photos of {removed} returned: "
        f"{leaked}; a fresh index of the same photos ranks the same photos at the same "
        f"distances: {same}"
    )
    sys.exit(0 if same and leaked == 0 else 1)


if __name__ == "__main__":
    main()
