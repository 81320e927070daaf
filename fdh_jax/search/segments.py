"""A collection's files: one manifest and append-only segments, each change committed by a rename.

    DIR/collection.json        the manifest: format, code lengths, encoder, the segments in order
    DIR/segments/00000007.npz  one change: the items it adds and the items it removes
    DIR/.lock                  held (flock) by the process that is changing the collection
    DIR/incoming/<run>/        segments of a multi-process add, written before its one commit

**A change** (an add, a remove, a compaction) writes one new segment file (temporary file, fsync,
rename), then a new manifest that lists it (temporary file, fsync, rename, fsync of the folder).
The manifest's rename is the commit: a kill before it leaves the previous manifest, which does not
list the new segment (an orphan, deleted by the next change); a kill after it leaves the change
whole. Nothing is ever rewritten in place, so a change costs the bytes of its own items plus the
manifest (a line per segment), whatever the size of the collection. `compact` writes the live
items as one segment and drops the others.

**Items** carry a sequence number (`seq`), given in insertion order and never reused: a segment's
`removed` lists the seq of the items it removes, and a replaced item is removed and added again
with a new seq, in the same segment. Codes are stored packed (`fdh_jax.search.bits.pack_codes`),
one array per code length.

The manifest records each segment's SHA-256 and size: a damaged or missing segment is named with
what to do, never skipped.

**A multi-process add** (`staging_run`) has each process write its segment into a folder of its
own under `incoming/`; one process then moves them into `segments/` and lists them all in one
manifest. The folder counts as in use while the committing process holds a shared flock on its
`.alive` file; a change deletes the folders of runs nobody holds (killed before their commit).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import re
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fdh_jax.common.atomic_files import fsync_directory, write_bytes_atomically

COLLECTION_FORMAT = "fdh_jax collection"
COLLECTION_FORMAT_VERSION = 1
MANIFEST = "collection.json"
SEGMENTS = "segments"
LOCK = ".lock"
INCOMING = "incoming"
_ALIVE = ".alive"
_SEGMENT_NAME = re.compile(r"^\d{8,}\.npz$")


class CollectionError(ValueError):
    """A collection that cannot be used as asked: not a collection, a damaged or missing segment,
    codes of another encoder, unknown ids. The message is one line naming the file or the ids
    and what to do."""


@dataclasses.dataclass
class Segment:
    """One change: the items it adds (in insertion order) and the seq of the items it removes.

    seq `[n]` int64; ids, paths: n strings; labels `[n]` int64 (-1: unknown); metadata: n JSON
    objects; codes: `{K: packed uint8 [n, ceil(K/8)]}` for every code length of the collection;
    removed `[r]` int64.
    """

    seq: np.ndarray
    ids: list[str]
    paths: list[str]
    labels: np.ndarray
    metadata: list[dict]
    codes: dict[int, np.ndarray]
    removed: np.ndarray

    @classmethod
    def empty(cls, bits: list[int]) -> Segment:
        """A segment with no items and no removals."""
        return cls(
            seq=np.zeros(0, np.int64),
            ids=[],
            paths=[],
            labels=np.zeros(0, np.int64),
            metadata=[],
            codes={k: np.zeros((0, -(-k // 8)), np.uint8) for k in bits},
            removed=np.zeros(0, np.int64),
        )


def _text(value: object) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)


def _segment_bytes(segment: Segment) -> bytes:
    fields = {
        "format_version": np.array(COLLECTION_FORMAT_VERSION, np.int64),
        "seq": np.asarray(segment.seq, np.int64),
        "ids_json": _text(segment.ids),
        "paths_json": _text(segment.paths),
        "labels": np.asarray(segment.labels, np.int64),
        "metadata_json": _text(segment.metadata),
        "removed": np.asarray(segment.removed, np.int64),
    } | {f"codes_{k}": np.asarray(packed, np.uint8) for k, packed in segment.codes.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **fields)
    return buffer.getvalue()


def segment_name(number: int) -> str:
    """The file of segment `number`, relative to the collection's folder."""
    return f"{SEGMENTS}/{number:08d}.npz"


def write_segment(directory: Path, number: int, segment: Segment) -> dict:
    """Writes `segment` as `segments/<number>.npz` (atomically, synced) and returns its manifest
    record: file, bytes, sha256, item and removal counts."""
    name = segment_name(number)
    return write_segment_as(directory / name, segment) | {"file": name}


def write_segment_as(path: Path, segment: Segment) -> dict:
    """Writes `segment` to `path` (atomically, synced) and returns its record, `"file"` being the
    file's name."""
    data = _segment_bytes(segment)
    write_bytes_atomically(path, data)
    fsync_directory(path.parent)
    return {
        "file": path.name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "items": len(segment.ids),
        "removed": int(len(segment.removed)),
    }


def _damaged(path: Path, why: str) -> CollectionError:
    return CollectionError(
        f"{path}: damaged collection segment ({why}); restore it from a backup of the "
        "collection: its changes cannot be recovered from the other files"
    )


def read_segment(directory: Path, record: dict, bits: list[int]) -> Segment:
    """The segment a manifest record names, checked against the record's size and SHA-256.
    Raises `CollectionError` naming the file if it is missing, damaged or inconsistent."""
    path = directory / record["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _damaged(path, "missing") from None
    except OSError as error:
        raise _damaged(path, f"unreadable: {error.strerror or error}") from None
    if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise _damaged(path, f"{len(data)} bytes that do not match the manifest's checksum")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            fields = {name: archive[name] for name in archive.files}
        segment = Segment(
            seq=fields["seq"],
            ids=json.loads(bytes(fields["ids_json"])),
            paths=json.loads(bytes(fields["paths_json"])),
            labels=fields["labels"],
            metadata=json.loads(bytes(fields["metadata_json"])),
            codes={k: fields[f"codes_{k}"] for k in bits},
            removed=fields["removed"],
        )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise _damaged(path, f"unreadable: {error}") from None
    n = len(segment.seq)
    if not (
        len(segment.ids) == len(segment.paths) == len(segment.labels) == n
        and len(segment.metadata) == n
        and all(segment.codes[k].shape == (n, -(-k // 8)) for k in bits)
    ):
        raise _damaged(path, "fields of different lengths")
    return segment


# ------------------------------------------------------------------------------------ manifest


def new_manifest(bits: list[int], encoder: dict | None, model_path: str | None) -> dict:
    """The manifest of an empty collection of codes of `bits` lengths, made by the encoder of
    identity `encoder` (None: codes given directly) loaded from `model_path`."""
    return {
        "format": COLLECTION_FORMAT,
        "format_version": COLLECTION_FORMAT_VERSION,
        "bits": sorted(int(k) for k in bits),
        "encoder": encoder,
        "model_path": model_path,
        "generation": 0,
        "next_seq": 0,
        "segments": [],
    }


def is_collection(directory: Path) -> bool:
    """Whether `directory` holds a collection manifest."""
    return (directory / MANIFEST).is_file()


def read_manifest(directory: Path) -> dict:
    """The manifest of the collection in `directory`; `CollectionError` (one line) if there is
    none, or it is not a collection manifest of this format version."""
    path = directory / MANIFEST
    if not path.is_file():
        what = "an empty folder" if directory.is_dir() and not any(directory.iterdir()) else None
        what = what or ("a folder" if directory.is_dir() else "not a folder")
        raise CollectionError(
            f"{directory} is not a collection ({what} without {MANIFEST}): give the folder of "
            "an existing collection, or a new folder and --workdir to create one"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CollectionError(f"{path}: unreadable collection manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != COLLECTION_FORMAT:
        raise CollectionError(f"{path} is not an fdh_jax collection manifest")
    if manifest.get("format_version") != COLLECTION_FORMAT_VERSION:
        raise CollectionError(
            f"{path}: collection format version {manifest.get('format_version')}, this code "
            f"reads version {COLLECTION_FORMAT_VERSION}; use the fdh_jax version that wrote it"
        )
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    """Commits `manifest`: temporary file, fsync, rename over the old one, fsync the folder."""
    write_bytes_atomically(directory / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
    fsync_directory(directory)


def remove_unlisted_segments(directory: Path, manifest: dict, keep: Path | None = None) -> None:
    """Deletes segment files the manifest does not list (those of a change killed before its
    commit, or dropped by a compaction), temporary files left by a kill, and the `incoming/`
    folders of multi-process adds that no process holds any more (`keep`: the caller's own run,
    spared). Call with the lock held: no other process can be writing then."""
    listed = {Path(record["file"]).name for record in manifest["segments"]}
    folder = directory / SEGMENTS
    for path in folder.iterdir() if folder.is_dir() else ():
        orphan = _SEGMENT_NAME.match(path.name) and path.name not in listed
        if orphan or path.name.startswith("."):
            path.unlink(missing_ok=True)
    for path in directory.glob(f".{MANIFEST}.tmp-*"):
        path.unlink(missing_ok=True)
    runs = directory / INCOMING
    for run in runs.iterdir() if runs.is_dir() else ():
        if run.name != getattr(keep, "name", None) and not _held(run):
            shutil.rmtree(run, ignore_errors=True)


def _held(run: Path) -> bool:
    """Whether a process holds the staging folder `run` (see `staging_run`)."""
    try:
        with open(run / _ALIVE, "r+b") as handle:  # writable: NFS needs it for an exclusive lock
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file: a run half made or half deleted by a kill
        return False
    return False


@contextmanager
def staging_run(directory: Path) -> Iterator[Path]:
    """A new folder `incoming/<random name>/` for the segments of a multi-process add, held (a
    shared flock on its `.alive` file) until the context exits, which deletes it. It is made
    under the write lock, so a change deleting unheld runs never sees it half made; a kill of
    the holder leaves it unheld: garbage for the next change to delete."""
    with write_lock(directory):
        run = directory / INCOMING / secrets.token_hex(8)
        run.mkdir(parents=True)
        handle = open(run / _ALIVE, "a+b")  # noqa: SIM115 (held until the context exits)
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
    try:
        yield run
    finally:
        shutil.rmtree(run, ignore_errors=True)
        handle.close()


@contextmanager
def write_lock(directory: Path) -> Iterator[None]:
    """Holds an exclusive lock on the collection while it is changed: changes from several
    processes are applied one after the other (the lock dies with its process, so a kill never
    leaves it held)."""
    with open(directory / LOCK, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
