"""The collection modes of the command line: add, remove, search, duplicates, compact.

    python -m fdh_jax.main --mode=add --collection=C --images=PHOTOS --workdir=W  # creates C
    python -m fdh_jax.main --mode=add --collection=C --images=a.jpg,b.jpg --ids=a,b
    python -m fdh_jax.main --mode=remove --collection=C --ids=a,@more_ids.txt
    python -m fdh_jax.main --mode=search --collection=C --query=q.jpg --topk=10
    python -m fdh_jax.main --mode=duplicates --collection=C --max_distance=2

`--mode=serve` (fdh_jax/serving/service.py) serves a collection over HTTP.

The encoder is the collection's own (the workdir or export it was created from, recorded in it)
unless `--workdir` names another copy of the same model. Every mode prints one result line (an
add or remove is committed when it is printed); an add names each photo it could not read on
stderr, adds the others, and exits with status 1.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fdh_jax.data.sources.image_files import ImageFilesSource
from fdh_jax.search import segments
from fdh_jax.search.collection import AddResult, Collection, CollectionError, open_collection
from fdh_jax.serving.load import load_encoder

SOME_PHOTOS_FAILED = 1  # the exit status of an add that left out unreadable photos


def parse_ids(text: str | None) -> list[str]:
    """`--ids`: comma-separated ids; an entry `@FILE` reads one id per line from FILE."""
    ids: list[str] = []
    for entry in (text or "").split(","):
        entry = entry.strip()
        if entry.startswith("@"):
            path = Path(entry[1:]).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"--ids: no file of ids at {path.resolve()}")
            ids.extend(line.strip() for line in path.read_text().splitlines() if line.strip())
        elif entry:
            ids.append(entry)
    return ids


def photo_paths(images: str) -> list[str]:
    """`--images`: comma-separated image files and folders (searched recursively, sorted), as
    absolute paths: a photo's id is its path, the same from any working directory."""
    paths: list[str] = []
    for entry in images.split(","):
        if entry.strip():
            paths.extend(os.path.abspath(p) for p in ImageFilesSource(entry.strip()).paths)
    return paths


def open_for_cli(
    directory: str,
    workdir: str | None,
    step: int | None,
    create: bool,
    need_encoder: bool = True,
) -> Collection:
    """The collection at `directory` with its encoder: from `workdir` if given, else the one
    recorded in the collection. `create`: make a new collection there from `workdir`.
    `need_encoder=False` (remove, duplicates, compact): no model is loaded (start-up time)."""
    path = Path(directory).expanduser()
    if not need_encoder and segments.is_collection(path):
        return open_collection(path)
    model = model_for_cli(path, workdir, create)
    return open_collection(path, load_encoder(model, step), create=create)


def model_for_cli(path: Path, workdir: str | None, create: bool) -> str:
    """Where to load the encoder of the collection at `path` from: `workdir` if given, else the
    model the collection records. `CollectionError` (what to do) if there is none: no such
    collection (and not `create`), a new one without `workdir`, a recorded model that is gone."""
    if not segments.is_collection(path):
        if not create:
            segments.read_manifest(path)  # raises: not a collection, with what to do
        if workdir is None:
            raise CollectionError(
                f"{path} is not a collection yet: give --workdir=TRAINING_WORKDIR_OR_EXPORT to "
                "create it with that model"
            )
        return workdir
    model = workdir or segments.read_manifest(path).get("model_path")
    if model is None:
        raise CollectionError(f"{path} records no model (codes given directly): give --workdir")
    if workdir is None and not Path(model).is_dir():
        raise CollectionError(
            f"{path} was made with the model at {model}, which is gone: give --workdir=W, a "
            "copy of that workdir or its export"
        )
    return model


def _progress(done: int, total: int, started: float) -> None:
    rate = done / max(time.perf_counter() - started, 1e-9)
    print(f"  encoded {done}/{total} photos ({rate:.1f}/s)", file=sys.stderr, flush=True)


def add_photos(collection: Collection, images: str, ids: str | None) -> int:
    """`--mode=add`: prints one line per unreadable photo (stderr) and the result line; returns
    the exit status (0, or `SOME_PHOTOS_FAILED`)."""
    paths, given = photos_and_ids(images, ids)
    result = collection.add(paths, ids=given, progress=progress_printer(len(paths)))
    return report_add(collection, result)


def photos_and_ids(images: str, ids: str | None) -> tuple[list[str], list[str] | None]:
    """`--images` and `--ids` of an add: the photos' paths, and their ids (None: the paths)."""
    paths = photo_paths(images)
    given = parse_ids(ids) if ids else None
    if given is not None and len(given) != len(paths):
        raise CollectionError(f"--ids names {len(given)} ids for {len(paths)} photos")
    return paths, given


def progress_printer(total: int) -> Callable[[int, int], None] | None:
    """A `progress` for `Collection.add` printing the rate, for adds of over 256 photos."""
    started = time.perf_counter()
    return (lambda d, t: _progress(d, t, started)) if total > 256 else None


def report_add(collection: Collection, result: AddResult) -> int:
    """Prints an add's unreadable photos (stderr) and its result line; returns the exit status
    (0, or `SOME_PHOTOS_FAILED`)."""
    for photo, why in result.failed:
        print(f"fdh_jax: not added: {photo}: {why}", file=sys.stderr, flush=True)
    failed = f"; {len(result.failed)} unreadable photo(s) not added" if result.failed else ""
    print(
        f"Added {len(result.ids)} photo(s) to {collection.directory} ({len(collection)} items)"
        f"{failed}",
        flush=True,
    )
    return SOME_PHOTOS_FAILED if result.failed else 0


def remove_items(collection: Collection, ids: str) -> None:
    """`--mode=remove`: all the ids or none (an unknown id is an error)."""
    removed = collection.remove(parse_ids(ids))
    print(
        f"Removed {removed} item(s) from {collection.directory} ({len(collection)} items)",
        flush=True,
    )


def search_collection(
    collection: Collection, query: str | None, ids: str | None, topk: int, bits: int | None
) -> None:
    """`--mode=search --collection`: ranked ids and paths per query photo (or item id)."""
    if (query is None) == (ids is None):
        raise CollectionError("--mode=search --collection takes --query=PHOTOS or --ids=IDS")
    names = photo_paths(query) if query else parse_ids(ids)
    if query:
        hits = collection.search(names, k=topk, bits=bits)
    else:
        hits = collection.search(ids=names, k=topk, bits=bits)
    lines = []
    for name, found_ids, paths, distances in zip(
        names, hits.ids, hits.paths, hits.distances, strict=True
    ):
        lines.append(f"query: {name}")
        lines.extend(
            f"  {rank:3d}. d={int(d):3d}  {item_id}" + (f"  {p}" if p and p != item_id else "")
            for rank, (item_id, p, d) in enumerate(zip(found_ids, paths, distances, strict=True), 1)
        )
    print("\n".join(lines), flush=True)


def print_duplicates(collection: Collection, max_distance: int, bits: int | None) -> None:
    """`--mode=duplicates`: one block per group of near-duplicates, then a count line."""
    groups = collection.near_duplicates(max_distance, bits=bits)
    lines = []
    for number, group in enumerate(groups, 1):
        lines.append(f"group {number} ({len(group)} items):")
        lines.extend(f"  {item_id}" for item_id in group)
    lines.append(
        f"{len(groups)} group(s) of near-duplicates (within {max_distance} bits) among "
        f"{len(collection)} items"
    )
    print("\n".join(lines), flush=True)


class ServeError(ValueError):
    """`--mode=serve` cannot start: the `[serve]` extra is missing, or a public host has no
    token."""


def serve_collection(collection: Collection, host: str, port: int, token: str | None) -> None:
    """`--mode=serve`. The service module is imported here: it needs the `[serve]` extra
    (FastAPI, uvicorn), which the other modes do without."""
    check_start(host, token)
    try:
        from fdh_jax.serving import service  # noqa: PLC0415
    except ImportError as error:
        raise ServeError(
            f"--mode=serve needs the serve extra ({error.name} is missing): "
            'pip install -e ".[serve]"'
        ) from None
    service.serve(collection, host, port, token)


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback name or address (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_start(host: str, token: str | None) -> None:
    """`ServeError` unless the server may start: a non-loopback host needs a token."""
    if not is_loopback(host) and not token:
        raise ServeError(
            f"--host={host} makes the collection reachable from other machines: set a token "
            "(--token=T or FDH_JAX_TOKEN) so that only its holders can add and remove photos"
        )
