"""A living collection of photos' hash codes: add, replace, remove, search, find near-duplicates.

    import fdh_jax
    encoder = fdh_jax.load_encoder("/tmp/fdh_cub100")          # a workdir or an export
    photos = fdh_jax.open_collection("/tmp/birds", encoder=encoder, create=True)
    added = photos.add(["a.jpg", "b.jpg"], ids=["a", "b"])    # encodes only these two
    hits = photos.search(["query.jpg"], k=10)                 # hits.ids, .paths, .distances
    photos.remove(["a"])
    groups = photos.near_duplicates(max_distance=2)           # [["b", "c"], ...]

A collection holds the codes of every length of one encoder, whose identity it records as a hash
index does, and refuses photos or queries from another. On disk it is a manifest and append-only
segments (`fdh_jax.search.segments`): every change is committed by one rename, so a kill at any
moment leaves each change whole or absent, and a change writes only its own items. A call that
returned is committed.

**Order and ties.** Items are kept in insertion order; re-adding an id replaces the item, which
then counts as added last (a remove and an add, committed together). `search` is exact and
breaks distance ties by insertion order, as `hamming_topk` breaks them by database index: its
results equal a brute-force scan of the live items in that order (tests/test_collection.py).

**Search structure.** Small collections are scanned. From `prefer_multi_index` on, the items
present when the multi-index was built are searched through it with the removed ones masked,
and items added since (the delta) are scanned; the multi-index is rebuilt in memory when the
delta or the removed items outgrow a fraction of it, so its cost stays that of a fresh one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fdh_jax.common.atomic_files import write_text_atomically
from fdh_jax.data.decode import BadImageError, decode_image
from fdh_jax.search import segments as store
from fdh_jax.search.bits import (
    InvalidCodesError,
    as_sign_codes,
    pack_codes,
    pack_words64,
    unpack_codes,
)
from fdh_jax.search.duplicates import connected_groups, pairs_within_scan
from fdh_jax.search.hash_index import prefer_multi_index
from fdh_jax.search.multi_index import MultiIndexHashing
from fdh_jax.search.scan import scan_topk
from fdh_jax.search.segments import CollectionError, Segment

# The delta scanned beside the multi-index is folded into a new one once it holds more than this
# many items and an eighth of the multi-index; likewise once a quarter of the multi-index's items
# are removed. Either keeps a search within a few percent of a freshly built multi-index.
_DELTA_MIN_ITEMS = 1 << 14
_DELTA_FRACTION = 8
_DEAD_FRACTION = 4
_ADD_CHUNK = 256  # photos decoded and encoded at a time by `add`
# near_duplicates considers probing multi-index tables from this many items on, where
# `MultiIndexHashing.range_probe_pays` says the radius is small enough; else it compares all
# pairs in blocks.
_PAIRS_MIN_ITEMS = 4096


class UnknownIdError(CollectionError):
    """Ids that are not in the collection (a `CollectionError`: one line naming them)."""


def _unknown(ids: Sequence[str], what: str) -> UnknownIdError:
    shown = ", ".join(repr(i) for i in ids[:5])
    more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    return UnknownIdError(f"{what}: no item with id {shown}{more} in the collection")


@dataclasses.dataclass(frozen=True)
class Item:
    """One item: its id, path ("" for an array), label (-1: unknown), metadata, insertion
    number `seq`, and `codes` `{K: int8 [K] in {-1, +1}}` for every code length."""

    id: str
    path: str
    label: int
    metadata: dict
    seq: int
    codes: dict[int, np.ndarray]


@dataclasses.dataclass
class AddResult:
    """What `add` did: `ids` of the items added (in input order, bad photos left out) and
    `failed`, `(photo, why)` for each photo that could not be read (not added)."""

    ids: list[str]
    failed: list[tuple[str, str]]


@dataclasses.dataclass
class NewItems:
    """Items checked and encoded for an add, not yet in the collection (`prepare_add`): the
    input positions `kept` (readable), their `codes` `{K: int8 [len(kept), K]}`, `failed`
    `(photo, why)`, and per input position its `given` id (None: `item-<seq>`), `paths`,
    `labels` and `metadata`."""

    kept: list[int]
    codes: dict[int, np.ndarray]
    failed: list[tuple[str, str]]
    given: list[str | None]
    paths: list[str]
    labels: np.ndarray
    metadata: list[dict]


@dataclasses.dataclass
class SearchResults:
    """Per query the top k live items, nearest first, ties by insertion order: `ids`, `paths`
    (Q lists of k'), `labels` and `distances` (`[Q, k']` int64 / int32); k' = min(k, len)."""

    ids: list[list[str]]
    paths: list[list[str]]
    labels: np.ndarray
    distances: np.ndarray


class _Growing:
    """An array that grows by appending, with capacity doubling (amortised O(1) per row)."""

    def __init__(self, tail: tuple[int, ...], dtype: Any):
        self._data = np.zeros((16, *tail), dtype)
        self.size = 0

    def extend(self, rows: np.ndarray) -> None:
        needed = self.size + len(rows)
        if needed > len(self._data):
            shape = (max(needed, 2 * len(self._data)), *self._data.shape[1:])
            grown = np.zeros(shape, self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : needed] = rows
        self.size = needed

    @property
    def view(self) -> np.ndarray:
        return self._data[: self.size]


class _Table:
    """Every item of the collection's segments in insertion (seq) order, live or removed."""

    def __init__(self, bits: list[int]):
        self.bits = bits
        self.seq = _Growing((), np.int64)
        self.words = {k: _Growing((-(-k // 64),), np.uint64) for k in bits}
        self.labels = _Growing((), np.int64)
        self.alive = _Growing((), bool)
        self.ids = _Growing((), object)  # str, as object arrays: fancy indexing for results
        self.paths = _Growing((), object)
        self.metadata: list[dict] = []
        self.row_of: dict[str, int] = {}  # live items only
        self.version = 0  # changes with every applied segment

    def apply(self, segment: Segment, name: str) -> None:
        """Applies one segment: its removals, then its items (the order a change is made in)."""
        if len(segment.removed):
            rows = np.searchsorted(self.seq.view, segment.removed)
            rows = np.minimum(rows, max(self.seq.size - 1, 0))
            found = self.seq.size > 0 and np.array_equal(self.seq.view[rows], segment.removed)
            if not found or not self.alive.view[rows].all():
                raise CollectionError(
                    f"{name} removes items the segments before it do not hold: the collection "
                    "is inconsistent; restore it from a backup"
                )
            self.alive.view[rows] = False
            for row in rows:
                del self.row_of[self.ids.view[row]]
        if len(segment.seq):
            if self.seq.size and segment.seq[0] <= self.seq.view[-1]:
                raise CollectionError(f"{name} adds items out of order: restore from a backup")
            first = self.seq.size
            self.seq.extend(segment.seq)
            for k in self.bits:
                self.words[k].extend(pack_words64(segment.codes[k])[0])
            self.labels.extend(segment.labels)
            self.alive.extend(np.ones(len(segment.seq), bool))
            self.ids.extend(np.array(segment.ids, dtype=object))
            self.paths.extend(np.array(segment.paths, dtype=object))
            self.metadata.extend(segment.metadata)
            for offset, item_id in enumerate(segment.ids):
                if item_id in self.row_of:
                    raise CollectionError(
                        f"{name} adds id {item_id!r} twice: restore from a backup"
                    )
                self.row_of[item_id] = first + offset
        self.version += 1

    def live_rows(self) -> np.ndarray:
        """Rows of the live items, ascending (= insertion order)."""
        return np.flatnonzero(self.alive.view)

    def packed(self, rows: np.ndarray, k: int) -> np.ndarray:
        """`[n, ceil(K/8)]` packed uint8 codes of `rows`, as `pack_codes` lays them out."""
        return np.ascontiguousarray(self.words[k].view[rows]).view(np.uint8)[:, : -(-k // 8)]


class _Searcher:
    """The search structure of one code length: a multi-index over the rows it was built on (the
    removed ones masked) plus a scan of the rows added since; or, for a small collection, a scan
    of the live rows. Rebuilt from the table when stale (see the module docstring)."""

    def __init__(self, table: _Table, k: int, use_index: bool):
        self.table, self.bits = table, k
        self.rows = table.live_rows()
        self.index = None
        if use_index and len(self.rows):
            self.index = MultiIndexHashing(table.packed(self.rows, k))
            self.columns = None
        else:
            self.columns = np.ascontiguousarray(table.words[k].view[self.rows].T)
        self.version = table.version
        self.delta_start = table.seq.size
        self._seen_version, self._current_state = None, ()

    def _current(self) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        """For the table as it is now: the live mask of the multi-index's rows and its count,
        the live rows added since the build and their codes as columns. Computed once per
        change of the table, not per search."""
        if self._seen_version != self.table.version:
            alive = self.table.alive.view[self.rows]
            delta = self.delta_start + np.flatnonzero(self.table.alive.view[self.delta_start :])
            columns = np.ascontiguousarray(self.table.words[self.bits].view[delta].T)
            self._current_state = (alive, int(alive.sum()), delta, columns)
            self._seen_version = self.table.version
        return self._current_state

    def stale(self, use_index: bool) -> bool:
        """Whether this structure no longer fits the table (or the method asked for)."""
        if use_index != (self.index is not None) or (self.index is None and len(self.rows) == 0):
            return True
        if self.index is None:
            return self.version != self.table.version
        dead = len(self.rows) - self._current()[1]
        delta = self.table.seq.size - self.delta_start
        limit = len(self.rows)
        return delta > max(_DELTA_MIN_ITEMS, limit // _DELTA_FRACTION) or (
            dead > limit // _DEAD_FRACTION
        )

    def search(self, query_words: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`query_words: [Q, W]` -> (distances `[Q, k]` int32, table rows `[Q, k]` int64)."""
        if self.index is None:
            distances, positions = scan_topk(query_words, self.columns, k, self.bits)
            return distances, self.rows[positions]
        parts = []
        packed = np.ascontiguousarray(query_words).view(np.uint8)[:, : -(-self.bits // 8)]
        alive, live, delta, columns = self._current()
        if live:
            mask = None if live == len(alive) else alive  # no removals: the unmasked kernel
            distances, positions = self.index.search(packed, min(k, live), alive=mask)
            parts.append((distances, self.rows[positions]))
        if len(delta):
            distances, positions = scan_topk(query_words, columns, min(k, len(delta)), self.bits)
            parts.append((distances, delta[positions]))
        if len(parts) == 1:
            return parts[0]
        distances = np.concatenate([p[0] for p in parts], axis=1)
        rows = np.concatenate([p[1] for p in parts], axis=1)
        order = np.argsort((distances.astype(np.int64) << 32) | rows, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(distances, order, 1), np.take_along_axis(rows, order, 1)


def _check_ids(ids: Sequence[str], count: int) -> list[str]:
    ids = list(ids)
    if len(ids) != count:
        raise CollectionError(f"{len(ids)} ids for {count} items: give one id per item")
    for item_id in ids:
        if not isinstance(item_id, str) or not item_id or len(item_id) > 1024:
            raise CollectionError(
                f"ids must be non-empty strings (at most 1024 characters), got {item_id!r}"
            )
    check_distinct_ids(ids)
    return ids


def check_distinct_ids(ids: Sequence[str | None]) -> None:
    """`CollectionError` naming the ids that `ids` holds twice (None: an id to generate). A
    photo's id is its path unless given, so the same photo twice in one add is refused too:
    one change cannot add one id twice."""
    named = [i for i in ids if i is not None]
    if len(set(named)) != len(named):
        seen: set[str] = set()
        repeated = sorted({i for i in named if i in seen or seen.add(i)})
        raise CollectionError(
            f"ids given twice in one call (a photo's id is its path unless given): "
            f"{', '.join(map(repr, repeated[:5]))}"
        )


def _check_metadata(metadata: Any, count: int) -> list[dict]:
    if metadata is None:
        return [{} for _ in range(count)]
    metadata = list(metadata)
    if len(metadata) != count or not all(isinstance(m, dict) for m in metadata):
        raise CollectionError(
            f"metadata must be one dict per item ({count}), got {len(metadata)} entries"
        )
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as error:
        raise CollectionError(f"metadata must be JSON objects: {error}") from None


def _decode_photos(photos: Sequence[Any]) -> tuple[list[int], list[np.ndarray], list[tuple]]:
    """Decodes paths (arrays pass through): (positions decoded, images, `(photo, why)` failed)."""
    kept, images, failed = [], [], []
    for position, photo in enumerate(photos):
        if isinstance(photo, np.ndarray):
            if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[-1] != 3:
                raise CollectionError(
                    f"each image array must be uint8 [H, W, 3], got {photo.dtype} {photo.shape}"
                )
            kept.append(position)
            images.append(photo)
            continue
        try:
            images.append(decode_image(os.fspath(photo)))
            kept.append(position)
        except BadImageError as error:
            failed.append((os.fspath(photo), error.reason))
    return kept, images, failed


def _encode_photos(
    encoder: Any, photos: list, progress: Callable[[int, int], None] | None
) -> tuple[list[int], dict[int, np.ndarray], list[tuple[str, str]]]:
    """Encodes `photos` a chunk at a time (decoding first, so a bad photo is set aside instead of
    failing the batch): (positions encoded, `{K: int8 [n, K]}`, `(photo, why)` failed)."""
    kept, failed, parts = [], [], []
    for start in range(0, len(photos), _ADD_CHUNK):
        positions, images, bad = _decode_photos(photos[start : start + _ADD_CHUNK])
        failed.extend(bad)
        if images:
            kept.extend(start + p for p in positions)
            parts.append(encoder.encode_images(images))
        if progress is not None:
            progress(min(start + _ADD_CHUNK, len(photos)), len(photos))
    codes = {
        int(k): np.concatenate([part[str(k)] for part in parts])
        if parts
        else np.zeros((0, int(k)), np.int8)
        for k in encoder.bits
    }
    return kept, codes, failed


class Collection:
    """A collection of items (hash codes with an id, a path, a label and metadata) stored in a
    directory. Open or create one with `open_collection`; see the module docstring.

    Attributes: `directory`, `bits` (the code lengths held), `encoder` (None: codes only),
    `identity` (the recorded encoder identity), `model_path` (where the encoder was loaded from
    when the collection was created), `last_change_bytes` (bytes the last change wrote).
    Thread-safe: changes and searches take a lock, so a search sees each change whole.
    """

    def __init__(self, directory: Path, manifest: dict, encoder: Any = None):
        self.directory = Path(directory)
        self.encoder = encoder
        self.last_change_bytes = 0
        self._lock = threading.RLock()
        self._load(manifest)

    def _load(self, manifest: dict) -> None:
        self.bits = [int(k) for k in manifest["bits"]]
        table = _Table(self.bits)
        for record in manifest["segments"]:
            table.apply(store.read_segment(self.directory, record, self.bits), record["file"])
        self._manifest, self._table, self._searchers = manifest, table, {}

    @property
    def identity(self) -> dict | None:
        """The identity of the encoder whose codes this holds (None: codes given directly)."""
        return self._manifest["encoder"]

    @property
    def model_path(self) -> str | None:
        """The workdir or export the encoder was loaded from when the collection was made."""
        return self._manifest.get("model_path")

    def __len__(self) -> int:
        return len(self._table.row_of)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._table.row_of

    def __iter__(self) -> Iterator[Item]:
        with self._lock:
            table, rows = self._table, self._table.live_rows()
        return (self._item(table, row) for row in rows)

    def ids(self) -> list[str]:
        """The ids of the live items, in insertion order."""
        with self._lock:
            return self._table.ids.view[self._table.live_rows()].tolist()

    def codes(self, bits: int | None = None) -> np.ndarray:
        """`[N, K]` int8 codes of the live items in insertion order (`bits`: K, default the
        longest), e.g. to build a `HashIndex` or evaluate."""
        length = self._length(bits)
        with self._lock:
            return unpack_codes(self._table.packed(self._table.live_rows(), length), length)

    def get(self, item_id: str, *, codes: bool = True) -> Item:
        """The item with this id (`codes=False`: without its codes, `{}`, which is faster);
        `UnknownIdError` if there is none."""
        with self._lock:
            if item_id not in self._table.row_of:
                raise _unknown([item_id], "get")
            return self._item(self._table, self._table.row_of[item_id], codes)

    def _item(self, table: _Table, row: int, with_codes: bool = True) -> Item:
        codes = (
            {k: _unpack_row(table.packed(np.array([row]), k), k) for k in self.bits}
            if with_codes
            else {}
        )
        return Item(
            id=table.ids.view[row],
            path=table.paths.view[row],
            label=int(table.labels.view[row]),
            metadata=table.metadata[row],
            seq=int(table.seq.view[row]),
            codes=codes,
        )

    def stats(self) -> dict:
        """Size, code lengths, encoder identity, segment count and bytes on disk."""
        with self._lock:
            records = self._manifest["segments"]
            return {
                "items": len(self),
                "bits": list(self.bits),
                "encoder": self.identity,
                "model_path": self.model_path,
                "segments": len(records),
                "removed_not_compacted": int(self._table.seq.size - len(self)),
                "segment_bytes": int(sum(r["bytes"] for r in records)),
            }

    def segment_files(self) -> list[Path]:
        """The segment files of the collection, oldest first."""
        with self._lock:
            return [self.directory / r["file"] for r in self._manifest["segments"]]

    # ------------------------------------------------------------------------------- changes

    def refresh(self) -> None:
        """Takes in the changes other processes committed since this one last looked."""
        with self._lock:
            self._sync(store.read_manifest(self.directory))

    def _sync(self, manifest: dict) -> None:
        records, known = manifest["segments"], self._manifest["segments"]
        if manifest["generation"] == self._manifest["generation"]:
            return
        if records[: len(known)] != known:  # compacted or merged elsewhere: read it all again
            self._load(manifest)
            return
        for record in records[len(known) :]:
            segment = store.read_segment(self.directory, record, self.bits)
            self._table.apply(segment, record["file"])
        self._manifest = manifest

    def _commit(self, manifest: dict, records: list[dict], generation: int | None = None) -> dict:
        """Writes the manifest listing `records`, of `generation` (default: the next); segment
        files are numbered by the generation that first lists them, so it must count past them."""
        generation = manifest["generation"] + 1 if generation is None else generation
        manifest = manifest | {"generation": generation, "segments": records}
        store.write_manifest(self.directory, manifest)
        return manifest

    def _change(self, build: Callable[[int], Segment | None]) -> None:
        """Commits one change. Under the write lock: takes in other processes' changes, has
        `build(next_seq)` make the segment from the state now, writes it, then the manifest (the
        commit), and applies it here. Then merges small trailing segments (`_merge_tail`)."""
        with self._lock, store.write_lock(self.directory):
            self._sync(store.read_manifest(self.directory))
            store.remove_unlisted_segments(self.directory, self._manifest)
            segment = build(self._manifest["next_seq"])
            if segment is None:
                return
            manifest = self._manifest
            record = store.write_segment(self.directory, manifest["generation"] + 1, segment)
            record["first_seq"] = manifest["next_seq"]
            next_seq = int(segment.seq[-1]) + 1 if len(segment.seq) else manifest["next_seq"]
            manifest = self._commit(
                manifest | {"next_seq": next_seq}, [*manifest["segments"], record]
            )
            self._table.apply(segment, record["file"])
            self._manifest = manifest
            self.last_change_bytes = (
                record["bytes"] + (self.directory / store.MANIFEST).stat().st_size
            )
            self._merge_tail()

    def _merge_tail(self) -> None:
        """Merges the last two segments while the older is at most twice the newer (items plus
        removals): segments then grow geometrically, so there are O(log N) of them and an item is
        rewritten O(log N) times in all. A merge changes no item; a kill during one leaves the
        collection as it was before it. Call with the write lock held."""
        weight = lambda r: r["items"] + r["removed"] + 1  # noqa: E731
        while len(records := self._manifest["segments"]) >= 2 and (
            weight(records[-2]) <= 2 * weight(records[-1])
        ):
            older, newer = (store.read_segment(self.directory, r, self.bits) for r in records[-2:])
            merged = _merge_segments(older, newer, self.bits)
            record = store.write_segment(self.directory, self._manifest["generation"] + 1, merged)
            record["first_seq"] = records[-2]["first_seq"]
            self._manifest = self._commit(self._manifest, [*records[:-2], record])
            self.last_change_bytes += record["bytes"]
            store.remove_unlisted_segments(self.directory, self._manifest)

    def add(
        self,
        photos: Sequence[Any] | None = None,
        ids: Sequence[str] | None = None,
        metadata: Sequence[dict] | None = None,
        *,
        labels: Sequence[int] | None = None,
        codes: Any = None,
        paths: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> AddResult:
        """Encodes and adds photos (image paths or uint8 `[H, W, 3]` arrays), or adds `codes`
        (`{K: [n, K]}` sign codes for every length of the collection, or one `[n, K]` array for a
        single-length one), as one change.

        `ids` default to each photo's path (so adding a file again replaces it) and for arrays
        and codes to `item-<seq>`; an id already in the collection is replaced. `metadata`: one
        JSON object per item; `labels`: class ids (default -1); `paths`: for codes. A photo that
        cannot be read is not added and is listed in the result's `failed`; the others are.
        """
        new = self.prepare_add(
            photos, ids, metadata, labels=labels, codes=codes, paths=paths, progress=progress
        )
        added: list[str] = []

        def build(next_seq: int) -> Segment | None:
            segment, segment_ids = self._new_segment(new, next_seq)
            added.extend(segment_ids)
            return segment

        self._change(build)
        return AddResult(ids=added, failed=new.failed)

    def prepare_add(
        self,
        photos: Sequence[Any] | None = None,
        ids: Sequence[str] | None = None,
        metadata: Sequence[dict] | None = None,
        *,
        labels: Sequence[int] | None = None,
        codes: Any = None,
        paths: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> NewItems:
        """The first half of `add` (same arguments): checks them and encodes the photos, but
        changes nothing. `stage_add` writes the result for a multi-process add."""
        if (photos is None) == (codes is None):
            raise CollectionError("add takes photos or codes=, one of the two")
        if codes is not None:
            codes = self._check_codes(codes)
            count = len(next(iter(codes.values())))
            item_paths = [str(p) for p in paths] if paths is not None else [""] * count
            given = [None] * count  # generated unless given
        else:
            photos = list(photos)
            count = len(photos)
            item_paths = ["" if isinstance(p, np.ndarray) else os.fspath(p) for p in photos]
            given = [p or None for p in item_paths]  # a file's id is its path unless given
            self._need_encoder("add photos")
        given = _check_ids(ids, count) if ids is not None else given
        check_distinct_ids(given)
        metadata = _check_metadata(metadata, count)
        if codes is None:  # the slow part, after every argument was checked
            kept, codes, failed = _encode_photos(self.encoder, photos, progress)
        else:
            kept, failed = list(range(count)), []
        labels = np.full(count, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        if len(item_paths) != count or labels.shape != (count,):
            raise CollectionError(f"give one path and one label per item ({count})")
        return NewItems(kept, codes, failed, given, item_paths, labels, metadata)

    def _new_segment(self, new: NewItems, next_seq: int) -> tuple[Segment | None, list[str]]:
        """The segment adding `new`'s kept items from seq `next_seq` on, replacing the items of
        the table with their ids; and those ids (None and [] if nothing is kept)."""
        if not new.kept:
            return None, []
        seq = np.arange(next_seq, next_seq + len(new.kept), dtype=np.int64)
        added = [new.given[p] or f"item-{s}" for p, s in zip(new.kept, seq, strict=True)]
        check_distinct_ids(added)  # a guard: a segment adding an id twice is unreadable
        table = self._table
        replaced = [table.row_of[i] for i in added if i in table.row_of]
        segment = Segment(
            seq=seq,
            ids=added,
            paths=[new.paths[p] for p in new.kept],
            labels=new.labels[new.kept],
            metadata=[new.metadata[p] for p in new.kept],
            codes={k: pack_codes(new.codes[k]) for k in self.bits},
            removed=np.sort(table.seq.view[replaced]).astype(np.int64),
        )
        return segment, added

    # ------------------------------------------------------------- a multi-process add

    def stage_add(self, new: NewItems, run: Path, part: int, seq_offset: int) -> None:
        """Writes `new` (from `prepare_add`) as part `part` of a multi-process add into its
        staging folder `run` (`segments.staging_run`): a segment numbered as if the parts before
        it, `seq_offset` items in all, were added just before, and `<part>.json`, its record and
        failed photos. Nothing changes until `commit_staged`. Every item needs an id (given or
        its path): a generated `item-<seq>` could change at the commit."""
        if any(new.given[p] is None for p in new.kept):
            raise CollectionError("a multi-process add needs an id per item: photo paths or ids")
        with self._lock:
            segment, _ = self._new_segment(new, self._manifest["next_seq"] + seq_offset)
        record = None
        if segment is not None:
            record = store.write_segment_as(run / f"{part}.npz", segment)
        receipt = {"record": record, "failed": [list(f) for f in new.failed]}
        write_text_atomically(run / f"{part}.json", json.dumps(receipt))

    def commit_staged(self, run: Path, parts: int) -> AddResult:
        """Adds the parts `0 .. parts - 1` staged in `run` (`stage_add`) as one change, in part
        order: one manifest write lists their segments, moved into `segments/`. A part numbered
        for the collection as it was when staged is moved as written; if another change came in
        between, it is renumbered and rewritten here. A kill before the manifest's rename leaves
        the collection as it was. The result equals that of one `add` of all the parts' items."""
        with self._lock, store.write_lock(self.directory):
            self._sync(store.read_manifest(self.directory))
            store.remove_unlisted_segments(self.directory, self._manifest, keep=run)
            staged, failed = _read_staged(run, parts, self.bits)
            added = [item_id for written, _ in staged for item_id in written.ids]
            check_distinct_ids(added)  # parts staged for different lists of photos
            manifest, number = self._manifest, self._manifest["generation"]
            next_seq, new_records, segments = manifest["next_seq"], [], []
            for written, record in staged:
                segment = self._renumbered(written, next_seq)
                number += 1
                if _same_numbers(segment, written):
                    name = store.segment_name(number)
                    os.replace(run / record["file"], self.directory / name)
                    record = record | {"file": name}
                else:
                    record = store.write_segment(self.directory, number, segment)
                new_records.append(record | {"first_seq": next_seq})
                segments.append(segment)
                next_seq += len(segment.seq)
            if not segments:
                return AddResult(ids=[], failed=failed)
            store.fsync_directory(self.directory / store.SEGMENTS)
            self._manifest = self._commit(
                manifest | {"next_seq": next_seq}, [*manifest["segments"], *new_records], number
            )
            for segment, record in zip(segments, new_records, strict=True):
                self._table.apply(segment, record["file"])
            self.last_change_bytes = sum(r["bytes"] for r in new_records) + (
                (self.directory / store.MANIFEST).stat().st_size
            )
            self._merge_tail()
        return AddResult(ids=added, failed=failed)

    def _renumbered(self, segment: Segment, next_seq: int) -> Segment:
        """`segment`'s items numbered from `next_seq`, replacing the table's items of their ids."""
        table = self._table
        replaced = [table.row_of[i] for i in segment.ids if i in table.row_of]
        return dataclasses.replace(
            segment,
            seq=np.arange(next_seq, next_seq + len(segment.seq), dtype=np.int64),
            removed=np.sort(table.seq.view[replaced]).astype(np.int64),
        )

    def _check_codes(self, codes: Any) -> dict[int, np.ndarray]:
        if not isinstance(codes, dict):
            if len(self.bits) != 1:
                raise CollectionError(
                    f"this collection holds {self.bits}-bit codes: give codes as {{K: [n, K]}}"
                )
            codes = {self.bits[0]: codes}
        codes = {int(k): v for k, v in codes.items()}
        if sorted(codes) != self.bits:
            raise CollectionError(
                f"codes of lengths {sorted(codes)}; this collection holds {self.bits}"
            )
        try:
            codes = {k: as_sign_codes(v, f"{k}-bit codes") for k, v in codes.items()}
        except InvalidCodesError as error:
            raise CollectionError(str(error)) from None
        counts = {len(v) for v in codes.values()}
        if len(counts) != 1 or any(v.shape[1] != k for k, v in codes.items()):
            raise CollectionError("codes must be [n, K] for each length K, with the same n")
        return codes

    def _need_encoder(self, what: str) -> None:
        if self.encoder is None:
            raise CollectionError(
                f"to {what}, open the collection with its encoder: "
                "open_collection(DIR, encoder=fdh_jax.load_encoder(WORKDIR_OR_EXPORT))"
            )

    def remove(self, ids: Sequence[str], *, missing: str = "error") -> int:
        """Removes the items with these ids, as one change; returns how many were removed. An id
        not in the collection raises `UnknownIdError` and removes nothing (`missing="ignore"`:
        skips it)."""
        if isinstance(ids, str):
            raise CollectionError("remove takes a list of ids, got one string; wrap it in a list")
        if missing not in ("error", "ignore"):
            raise ValueError(f"missing must be error or ignore, got {missing!r}")
        ids = list(dict.fromkeys(ids))
        count = 0

        def build(next_seq: int) -> Segment | None:
            nonlocal count
            table = self._table
            unknown = [i for i in ids if i not in table.row_of]
            if unknown and missing == "error":
                raise _unknown(unknown, "remove (nothing removed)")
            rows = [table.row_of[i] for i in ids if i in table.row_of]
            count = len(rows)
            if not rows:
                return None
            segment = Segment.empty(self.bits)
            segment.removed = np.sort(table.seq.view[rows]).astype(np.int64)
            return segment

        self._change(build)
        return count

    def compact(self) -> None:
        """Rewrites the live items as one segment and deletes the others (the space of removed
        items is freed). Items, order and every search result stay the same."""
        with self._lock, store.write_lock(self.directory):
            self._sync(store.read_manifest(self.directory))
            table, rows = self._table, self._table.live_rows()
            segment = Segment(
                seq=table.seq.view[rows].copy(),
                ids=table.ids.view[rows].tolist(),
                paths=table.paths.view[rows].tolist(),
                labels=table.labels.view[rows].copy(),
                metadata=[table.metadata[r] for r in rows],
                codes={k: table.packed(rows, k) for k in self.bits},
                removed=np.zeros(0, np.int64),
            )
            record = store.write_segment(self.directory, self._manifest["generation"] + 1, segment)
            record["first_seq"] = int(segment.seq[0]) if len(rows) else self._manifest["next_seq"]
            self._manifest = self._commit(self._manifest, [record])
            compacted = _Table(self.bits)
            compacted.apply(segment, record["file"])
            self._table, self._searchers = compacted, {}
            self.last_change_bytes = record["bytes"]
            store.remove_unlisted_segments(self.directory, self._manifest)

    # -------------------------------------------------------------------------------- search

    def _length(self, bits: int | None) -> int:
        if bits is None:
            return max(self.bits)
        if int(bits) not in self.bits:
            raise CollectionError(f"bits={bits}: this collection holds {self.bits}-bit codes")
        return int(bits)

    def _query_words(self, queries: Any, codes: Any, ids: Any, k: int) -> np.ndarray:
        """`[Q, W]` uint64 words of the queries, given as photos, codes or item ids."""
        if sum(x is not None for x in (queries, codes, ids)) != 1:
            raise CollectionError("search takes query photos, codes= or ids=, one of the three")
        if ids is not None:
            if isinstance(ids, str):
                raise CollectionError("ids= takes a list of ids; wrap the one id in a list")
            with self._lock:
                unknown = [i for i in ids if i not in self._table.row_of]
                if unknown:
                    raise _unknown(unknown, "search")
                rows = [self._table.row_of[i] for i in ids]
                return self._table.words[k].view[rows].copy()
        if queries is not None:
            self._need_encoder("search by photo")
            if isinstance(queries, (str, os.PathLike)):
                raise CollectionError("queries must be a list of photos; wrap the one in a list")
            codes = self.encoder.encode_images(list(queries), k)[str(k)]
        try:
            codes = as_sign_codes(codes, "query codes")
        except InvalidCodesError as error:
            raise CollectionError(str(error)) from None
        if codes.shape[1] != k:
            raise CollectionError(f"query codes have {codes.shape[1]} bits, the search {k}")
        return pack_words64(codes)[0]

    def search(
        self,
        queries: Sequence[Any] | None = None,
        k: int = 10,
        *,
        codes: Any = None,
        ids: Sequence[str] | None = None,
        bits: int | None = None,
        method: str = "auto",
    ) -> SearchResults:
        """The k live items nearest to each query, exact, ties by insertion order.

        Queries are photos (paths or uint8 arrays, encoded with the collection's encoder),
        `codes` (`[Q, K]` sign codes) or `ids` of items of the collection. `bits`: the code
        length (default the longest). `method`: "scan", "multi_index" or "auto" (the multi-index
        where `prefer_multi_index` says it pays); the results are the same.
        """
        if method not in ("auto", "scan", "multi_index"):
            raise ValueError(f"method must be auto, scan or multi_index, got {method!r}")
        if int(k) != k or k < 1:
            raise CollectionError(f"k must be a positive integer, got {k}")
        length = self._length(bits)
        query_words = self._query_words(queries, codes, ids, length)
        with self._lock:
            table, k = self._table, min(int(k), len(self))
            if k == 0:
                rows = np.zeros((len(query_words), 0), np.int64)
                distances = np.zeros((len(query_words), 0), np.int32)
            else:
                use_index = method == "multi_index" or (
                    method == "auto" and prefer_multi_index(len(self), length)
                )
                searcher = self._searchers.get(length)
                if searcher is None or searcher.stale(use_index):
                    searcher = self._searchers[length] = _Searcher(table, length, use_index)
                distances, rows = searcher.search(query_words, k)
            return SearchResults(
                ids=table.ids.view[rows].tolist(),
                paths=table.paths.view[rows].tolist(),
                labels=table.labels.view[rows],
                distances=distances,
            )

    def near_duplicates(
        self, max_distance: int, *, bits: int | None = None, method: str = "auto"
    ) -> list[list[str]]:
        """Groups of live items within `max_distance` bits of each other: the connected
        components (of two or more items) of the graph linking every two items at most
        `max_distance` apart. Each group lists ids in insertion order; groups are ordered by their
        first item. Pairs are found by range search through multi-index tables for large
        collections ("multi_index"), or by comparing all pairs in blocks ("scan"); the same
        groups either way."""
        if method not in ("auto", "scan", "multi_index"):
            raise ValueError(f"method must be auto, scan or multi_index, got {method!r}")
        length = self._length(bits)
        if int(max_distance) != max_distance or not 0 <= max_distance <= length:
            raise CollectionError(
                f"max_distance must be an integer in [0, {length}], got {max_distance}"
            )
        with self._lock:
            table, rows = self._table, self._table.live_rows()
            words = table.words[length].view[rows]
        if len(rows) < 2:
            return []
        radius = int(max_distance)
        index = None
        if method == "multi_index" or (method == "auto" and len(rows) >= _PAIRS_MIN_ITEMS):
            index = MultiIndexHashing(table.packed(rows, length))
            if method == "auto" and not index.range_probe_pays(radius):
                index = None
        if index is not None:
            first, second, _ = index.pairs_within(radius)
        else:
            first, second = pairs_within_scan(words, radius)
        groups = connected_groups(len(rows), first, second)
        return [table.ids.view[rows[group]].tolist() for group in groups]


def _unpack_row(packed: np.ndarray, k: int) -> np.ndarray:
    return np.where(np.unpackbits(packed[0], count=k) == 1, 1, -1).astype(np.int8)


def _merge_segments(older: Segment, newer: Segment, bits: list[int]) -> Segment:
    """One segment equal to applying `older` then `newer`: older's items that newer removes are
    dropped, with newer's removals of them; the removals of earlier items are kept."""
    keep = ~np.isin(older.seq, newer.removed)
    removed = np.union1d(older.removed, newer.removed[~np.isin(newer.removed, older.seq)])
    kept = np.flatnonzero(keep)
    return Segment(
        seq=np.concatenate([older.seq[kept], newer.seq]),
        ids=[older.ids[i] for i in kept] + newer.ids,
        paths=[older.paths[i] for i in kept] + newer.paths,
        labels=np.concatenate([older.labels[kept], newer.labels]),
        metadata=[older.metadata[i] for i in kept] + newer.metadata,
        codes={k: np.concatenate([older.codes[k][kept], newer.codes[k]]) for k in bits},
        removed=removed.astype(np.int64),
    )


def _read_staged(
    run: Path, parts: int, bits: list[int]
) -> tuple[list[tuple[Segment, dict]], list[tuple[str, str]]]:
    """The segments staged in `run` by parts `0 .. parts - 1` with their records, in part order
    (parts that kept nothing have none), and every part's failed photos."""
    staged, failed = [], []
    for part in range(parts):
        path = run / f"{part}.json"
        if not path.is_file():
            raise CollectionError(
                f"{path} is missing: process {part} did not finish its part of the add; nothing "
                "was added: run the same command again"
            )
        receipt = json.loads(path.read_text(encoding="utf-8"))
        failed.extend((photo, why) for photo, why in receipt["failed"])
        if receipt["record"] is not None:
            record = receipt["record"]
            staged.append((store.read_segment(run, record, bits), record))
    return staged, failed


def _same_numbers(one: Segment, other: Segment) -> bool:
    return np.array_equal(one.seq, other.seq) and np.array_equal(one.removed, other.removed)


def _check_encoder(manifest: dict, encoder: Any, directory: Path) -> None:
    """`CollectionError` (one line, both sides named) unless `encoder` made the collection's
    codes: the same parameters, code lengths and preprocessing."""
    made_by = manifest["encoder"]
    if made_by is None:
        raise CollectionError(
            f"{directory} holds codes given directly, made by no recorded model: open it without "
            "an encoder and search it with codes="
        )
    mine = encoder.identity
    if made_by.get("fingerprint") != mine["fingerprint"]:
        raise CollectionError(
            f"{directory} holds codes of model {str(made_by.get('fingerprint'))[:12]} (step "
            f"{made_by.get('step')}), not of this model {mine['fingerprint'][:12]} (step "
            f"{mine['step']}): use that model, or a new collection for this one"
        )
    for field in ("bits", "preprocessing"):
        if made_by.get(field) != mine[field]:
            raise CollectionError(
                f"{directory} holds codes made with {field} {made_by.get(field)}, this encoder "
                f"has {mine[field]}: use the collection's model"
            )


def open_collection(
    directory: str | os.PathLike,
    encoder: Any = None,
    *,
    create: bool = False,
    bits: Sequence[int] | None = None,
) -> Collection:
    """Opens the collection in `directory`, or with `create=True` makes a new one there (the
    folder must be new or empty) for the codes of `encoder` (a `fdh_jax.load_encoder` result),
    or, with no encoder, for codes of the `bits` lengths given directly.

    With an encoder, the collection must hold its codes (`CollectionError` naming both models
    otherwise). Raises `CollectionError` with one line for a folder that is not a collection and
    for a damaged segment.
    """
    directory = Path(directory).expanduser()
    if create and not store.is_collection(directory):
        _create(directory, encoder, bits)
    for attempt in range(3):  # a segment can vanish under a compaction by another process
        manifest = store.read_manifest(directory)
        if encoder is not None:
            _check_encoder(manifest, encoder, directory)
        try:
            return Collection(directory, manifest, encoder)
        except CollectionError:
            if attempt == 2 or store.read_manifest(directory) == manifest:
                raise
    raise AssertionError("unreachable")


def _create(directory: Path, encoder: Any, bits: Sequence[int] | None) -> None:
    if encoder is None and not bits:
        raise CollectionError(
            "a new collection needs encoder= (the model of its codes) or bits= (for codes given "
            "directly)"
        )
    if directory.exists() and not directory.is_dir():
        raise CollectionError(f"{directory} is a file, not a folder for a collection")
    if directory.is_dir() and any(
        p.name not in (store.LOCK, store.SEGMENTS) for p in directory.iterdir()
    ):
        raise CollectionError(
            f"{directory} holds files and no collection: give a new or empty folder to create one"
        )
    (directory / store.SEGMENTS).mkdir(parents=True, exist_ok=True)
    with store.write_lock(directory):
        if store.is_collection(directory):  # another process made it meanwhile
            return
        lengths = list(encoder.bits) if encoder is not None else [int(k) for k in bits]
        identity = encoder.identity if encoder is not None else None
        model_path = getattr(encoder, "source_path", None)
        store.write_manifest(directory, store.new_manifest(lengths, identity, model_path))
