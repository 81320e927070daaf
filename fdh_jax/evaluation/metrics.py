"""Retrieval metrics for hash codes ranked by Hamming distance.

Protocol (docs/design.md, "Evaluation protocol"): every test image queries the whole database
(the train split); a database item is relevant when its label equals the query's label.

Ranking and ties. Hamming distances are integers in [0, K], so ties are the rule, not the exception,
and the tie rule moves mAP by points at short code lengths. `tie_break` chooses it:

- `"index"` (default): rank by distance, ties broken stably by database index. Identical to a
  per-query `np.argsort(distance, kind="stable")` loop.
- `"expected"`: the exact expectation of AP when the items inside each distance tie are put in a
  uniformly random order (tie-aware AP, McSherry & Najork, ECIR 2008). Closed form, see
  `_expected_average_precision`.
- `"semicon"`: the SEMICON / ADSH evaluation (`utils/evaluate.py` there), whose default
  `topk=-1` turns `retrieval[argsort(dist)][:topk]` into "drop the last-ranked item". We rank with
  the `"index"` rule (torch's argsort order of ties is arbitrary and cannot be reproduced) and
  compute AP over the first N - 1 ranked items, normalised by the relevant items among them; with
  an explicit `topk` it is mAP@topk, as there.

AP normalisation. mAP@all: AP = mean over all R relevant items of precision at each one's rank.
mAP@k (the field's `CalcTopMap` convention): mean precision over the relevant items ranked within
the top k, i.e. normalised by the relevant items *retrieved*, not by min(R, k). A query with no
relevant item in the database (or none within the top k) has AP 0 and still counts in the mean.

Algorithm. No sort. Queries are taken in class order (all queries of a class share their relevant
set); for a chunk of up to 64 queries one jitted XLA kernel computes Hamming distances from packed
32-bit words (`population_count` of XORs) and, per (query, database item), a histogram bin
(query, distance, number of the query's relevant items earlier in database order). One
`np.bincount` (a scatter-add on accelerators) then gives, per query, how many database items lie
at each distance and how many of those precede each relevant item, so a relevant item's rank is
"items at smaller distance + items at equal distance with smaller index + 1". XLA computes the
next chunk while NumPy bins the current one. The database is processed in blocks and histograms
are capped at `_MAX_BINS` counters, so memory stays bounded for any size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from fdh_jax.search.bits import pack_query_and_database, word_hamming_distance

TieBreak = Literal["index", "expected", "semicon"]

_MAX_BINS = 1 << 22  # histogram counters per chunk (x8 bytes)
_DB_BLOCK = 1 << 16  # database items per kernel call
_MAX_QUERY_CHUNK = 64  # queries per kernel call
_DEVICE_HISTOGRAM = False  # tests set True to run the accelerator path on CPU


@jax.jit
def _segment_keys(
    query_words: jax.Array,
    db_words: jax.Array,
    segment_table: jax.Array,
    slot: jax.Array,
    row_base: jax.Array,
    row_segments: jax.Array,
) -> jax.Array:
    """Histogram bin of every (query, database item).

    `query_words: [C, W]`, `db_words: [B, W]` uint32; `segment_table: [S, B]` int32, for each class
    in the chunk the number of its relevant items before each database item of this block;
    `slot: [C]` int32 the row's class in the table; `row_base: [C]` int32 the row's first bin;
    `row_segments: [C]` int32 the row's relevant items in this block + 1
    -> `[C, B]` int32 keys `row_base + distance * row_segments + segment`: per row, bins ordered
    by distance, then by segment, so per-distance cumulative sums run along contiguous memory.
    """
    distance = word_hamming_distance(query_words, db_words)
    return row_base[:, None] + distance * row_segments[:, None] + segment_table[slot]


@partial(jax.jit, static_argnames=("num_bins",))
def _scatter_histogram(keys: jax.Array, num_rows: jax.Array, num_bins: int) -> jax.Array:
    """Accelerator bincount of `keys: [C, B]` rows < num_rows -> `[num_bins]` int32."""
    keep = jnp.arange(keys.shape[0])[:, None] < num_rows
    keys = jnp.where(keep, keys, num_bins)
    return jnp.zeros(num_bins, jnp.int32).at[keys.ravel()].add(1, mode="drop")


@dataclass
class _RankingStatistics:
    """Sufficient statistics of one query chunk (all of one class).

    query_index: [C] rows into the query set; counts_by_distance: [C, K+1] database items at each
    distance; relevant_distance: [C, R] distance of each relevant item (database index order);
    tie_before: [C, R] database items at the same distance with a smaller index.
    """

    query_index: np.ndarray
    counts_by_distance: np.ndarray
    relevant_distance: np.ndarray
    tie_before: np.ndarray

    def index_ranks(self) -> np.ndarray:
        """[C, R] 1-based rank of each relevant item under the "index" tie rule, ascending."""
        less = np.cumsum(self.counts_by_distance, axis=1) - self.counts_by_distance
        rank = np.take_along_axis(less, self.relevant_distance, 1) + self.tie_before + 1
        order = np.argsort(self.relevant_distance, axis=1, kind="stable")
        return np.take_along_axis(rank, order, 1)

    def relevant_counts_by_distance(self) -> np.ndarray:
        """[C, K+1] relevant items at each distance."""
        rows, num_distances = self.counts_by_distance.shape
        offsets = np.arange(rows)[:, None] * num_distances + self.relevant_distance
        return np.bincount(offsets.ravel(), minlength=rows * num_distances).reshape(
            rows, num_distances
        )


def _validate_labels(labels: Any, size: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != size:
        raise ValueError(
            f"{name} must be 1-D with {size} entries (one per code), got {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer class ids, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def _histogram_and_columns(
    keys: jax.Array, num_rows: int, num_bins: int, columns: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One kernel call's keys -> (bincount `[num_bins]` int64 of rows < num_rows,
    keys at `columns`: `[num_rows, len(columns)]`)."""
    if keys.devices() == {jax.devices("cpu")[0]} and not _DEVICE_HISTOGRAM:
        host_keys = np.asarray(keys)[:num_rows]  # np.bincount beats XLA's CPU scatter ~4x
        return np.bincount(host_keys.ravel(), minlength=num_bins), host_keys[:, columns]
    # Sizes padded to powers of two so that few shapes compile.
    padded_bins = 1 << max(num_bins - 1, 1).bit_length()
    histogram = _scatter_histogram(keys, num_rows, padded_bins)
    padded_columns = np.zeros(1 << max(len(columns) - 1, 0).bit_length(), np.int32)
    padded_columns[: len(columns)] = columns
    gathered = np.asarray(keys[:, padded_columns])[:num_rows, : len(columns)]
    return np.asarray(histogram)[:num_bins].astype(np.int64), gathered


def _ranking_statistics(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    *,
    include_unmatched: bool,
) -> tuple[Iterator[_RankingStatistics], int, int, int]:
    """Validates inputs -> (iterator of per-chunk statistics, Q, N, K).

    Queries whose class is absent from the database are skipped unless include_unmatched.
    """
    query_words, db_words, bits = pack_query_and_database(query_codes, db_codes)
    num_query, num_db = query_words.shape[0], db_words.shape[0]
    query_labels = _validate_labels(query_labels, num_query, "query_labels")
    db_labels = _validate_labels(db_labels, num_db, "db_labels")
    if num_db == 0:
        raise ValueError("the database is empty")
    return (
        iter(
            _RankingPipeline(
                query_words, db_words, bits, query_labels, db_labels, include_unmatched
            )
        ),
        num_query,
        num_db,
        bits,
    )


def _query_chunks(costs: np.ndarray) -> list[tuple[int, int]]:
    """Greedy [start, end) runs of at most _MAX_QUERY_CHUNK rows and _MAX_BINS bins (>= 1 row)."""
    chunks, start = [], 0
    while start < len(costs):
        total = np.cumsum(costs[start : start + _MAX_QUERY_CHUNK])
        end = start + max(1, int(np.searchsorted(total, _MAX_BINS, side="right")))
        chunks.append((start, end))
        start = end
    return chunks


@dataclass
class _BlockTask:
    """One dispatched kernel call: database block `block` against one query chunk."""

    block: int
    keys: jax.Array  # [padded rows, block size] int32 bin keys (being computed)
    num_rows: int
    num_bins: int
    columns: np.ndarray  # the chunk's relevant items in this block, block-relative, run by run
    runs: list  # per class run: (query rows, first bin, relevant items in block, column bounds)


class _RankingPipeline:
    """Iterates the `_RankingStatistics` of all query chunks, two stages deep.

    Queries are taken in class order in chunks (`_query_chunks`), each chunk against the database
    in blocks of `_DB_BLOCK`. For each (chunk, block) the XLA kernel `_segment_keys` is
    dispatched (stage 1, `_launch`), and the host bins the previous call's keys while it runs
    (stage 2, `_consume`). State, all on `self`:
    - `relevant_before[c]`, `relevant_index[c]`: per class of the current chunks, the relevant
      items before each database item and the relevant items' indices (dropped once the class
      order has passed the class);
    - `running[r]`: for run r (the queries of one class) of the current chunk, its counts by
      distance, relevant distances and ties, accumulated over the database blocks.
    """

    def __init__(self, query_words, db_words, bits, query_labels, db_labels, include_unmatched):
        self.query_words, self.num_distances = query_words, bits + 1
        self.num_db = db_words.shape[0]
        self.block = min(self.num_db, _DB_BLOCK)
        self.block_starts = list(range(0, self.num_db, self.block))
        self.db_blocks = [jnp.asarray(db_words[s : s + self.block]) for s in self.block_starts]
        classes, self.query_class = np.unique(query_labels, return_inverse=True)
        position = np.minimum(np.searchsorted(classes, db_labels), len(classes) - 1)
        # -1: no query has the item's class
        self.db_class = np.where(classes[position] == db_labels, position, -1)
        known = self.db_class >= 0
        self.relevant_per_block = np.zeros((len(classes), len(self.block_starts)), np.int64)
        np.add.at(
            self.relevant_per_block, (self.db_class[known], np.flatnonzero(known) // self.block), 1
        )
        order = np.argsort(self.query_class, kind="stable")
        if not include_unmatched:
            order = order[self.relevant_per_block.sum(1)[self.query_class[order]] > 0]
        self.query_order = order
        bins_per_query = (self.relevant_per_block.max(1) + 1) * self.num_distances
        self.chunks = _query_chunks(bins_per_query[self.query_class[order]])
        self.relevant_before: dict[int, np.ndarray] = {}
        self.relevant_index: dict[int, np.ndarray] = {}
        self.running: dict[int, tuple] = {}

    def __iter__(self) -> Iterator[_RankingStatistics]:
        previous = None
        for task in self._launch():
            if previous is not None:
                yield from self._consume(previous)
            previous = task
        if previous is not None:
            yield from self._consume(previous)

    def _launch(self) -> Iterator[_BlockTask]:
        """Dispatches the kernel for every (chunk, database block), in order."""
        for start, end in self.chunks:
            rows = self.query_order[start:end]
            run_class, run_start, run_size = np.unique(
                self.query_class[rows], return_index=True, return_counts=True
            )
            self._track_classes(run_class)
            padded = 1 << (len(rows) - 1).bit_length()
            chunk_words = np.zeros((padded, self.query_words.shape[1]), np.uint32)
            chunk_words[: len(rows)] = self.query_words[rows]
            slot = np.zeros(padded, np.int32)
            slot[: len(rows)] = np.repeat(np.arange(len(run_class)), run_size)
            for b in range(len(self.block_starts)):
                yield self._launch_block(b, rows, chunk_words, slot, run_class, run_start, run_size)

    def _track_classes(self, run_class: np.ndarray) -> None:
        """Relevant-item tables for the chunk's classes; drops the classes already passed."""
        for c in list(self.relevant_before):
            if c < run_class[0]:  # classes come in order
                del self.relevant_before[c], self.relevant_index[c]
        for c in run_class:
            if c not in self.relevant_before:
                is_relevant = self.db_class == c
                self.relevant_before[c] = (np.cumsum(is_relevant) - is_relevant).astype(np.int32)
                self.relevant_index[c] = np.flatnonzero(is_relevant)

    def _launch_block(self, b, rows, chunk_words, slot, run_class, run_start, run_size):
        db_start = self.block_starts[b]
        db_end = min(db_start + self.block, self.num_db)
        padded = len(slot)
        table = np.zeros((1 << (len(run_class) - 1).bit_length(), db_end - db_start), np.int32)
        columns, column_bounds = [], [0]
        for s, c in enumerate(run_class):
            before = self.relevant_before[c]
            table[s] = before[db_start:db_end] - before[db_start]
            index = self.relevant_index[c]
            lo, hi = np.searchsorted(index, (db_start, db_end))
            columns.append(index[lo:hi] - db_start)
            column_bounds.append(column_bounds[-1] + hi - lo)
        in_block = self.relevant_per_block[run_class, b]
        row_bins = np.repeat((in_block + 1) * self.num_distances, run_size)
        row_base = np.zeros(padded, np.int32)
        row_base[: len(rows)] = np.cumsum(row_bins) - row_bins
        row_segments = np.ones(padded, np.int32)
        row_segments[: len(rows)] = np.repeat(in_block + 1, run_size)
        keys = _segment_keys(chunk_words, self.db_blocks[b], table, slot, row_base, row_segments)
        runs = [
            (rows[i : i + n], int(row_base[i]), int(r), column_bounds[s : s + 2])
            for s, (i, n, r) in enumerate(zip(run_start, run_size, in_block, strict=True))
        ]
        return _BlockTask(b, keys, len(rows), int(row_bins.sum()), np.concatenate(columns), runs)

    def _consume(self, task: _BlockTask) -> list[_RankingStatistics]:
        """Bins one kernel call's keys into the runs' statistics; returns the runs finished
        with the last database block."""
        histogram, column_keys = _histogram_and_columns(
            task.keys, task.num_rows, task.num_bins, task.columns
        )
        done, row, num_distances = [], 0, self.num_distances
        for run, (query_index, base, in_block, (c0, c1)) in enumerate(task.runs):
            n = len(query_index)
            if task.block == 0:
                self.running[run] = (np.zeros((n, num_distances), np.int64), [], [])
            counts, distances, ties = self.running[run]
            segments = in_block + 1
            block_histogram = histogram[base : base + n * num_distances * segments]
            block_histogram = block_histogram.reshape(n, num_distances, segments)
            if in_block:
                distance = (column_keys[row : row + n, c0:c1] - base) // segments
                distance -= np.arange(n)[:, None] * num_distances
                # Items at the relevant item's distance, up to and including it, in this block:
                # relevant item r is the last item of segment r.
                upto = np.cumsum(block_histogram, axis=2)
                rows_, relevant_ = np.arange(n)[:, None], np.arange(in_block)[None, :]
                within = upto[rows_, distance, relevant_] - 1
                distances.append(distance)
                ties.append(np.take_along_axis(counts, distance, 1) + within)
            counts += block_histogram.sum(2)
            row += n
            if task.block == len(self.block_starts) - 1:
                empty = np.zeros((n, 0), np.int64)
                done.append(
                    _RankingStatistics(
                        query_index=query_index,
                        counts_by_distance=counts,
                        relevant_distance=np.concatenate(distances, 1) if distances else empty,
                        tie_before=np.concatenate(ties, 1) if ties else empty,
                    )
                )
        return done


def _topk_average_precision(ranks: np.ndarray, topk: int | None) -> np.ndarray:
    """`ranks: [C, R]` ascending 1-based ranks of the relevant items -> AP `[C]`."""
    if ranks.shape[1] == 0:
        return np.zeros(ranks.shape[0])
    precision = np.arange(1, ranks.shape[1] + 1) / ranks
    if topk is None:
        return precision.mean(1)
    retrieved = ranks <= topk
    num_retrieved = retrieved.sum(1)
    total = np.where(retrieved, precision, 0.0).sum(1)
    return np.where(num_retrieved > 0, total / np.maximum(num_retrieved, 1), 0.0)


def _harmonic_numbers(n: int) -> np.ndarray:
    """[n + 1] float64, H[m] = sum_{i=1..m} 1/i."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])


def _expected_average_precision(stats: _RankingStatistics, harmonic: np.ndarray) -> np.ndarray:
    """Tie-aware AP `[C]`: E[AP] over uniformly random orders inside every distance tie.

    For a tie group with n items, r of them relevant, after a items (b relevant) at smaller
    distance: a relevant item of the group sits at a uniform position p in 1..n, and given p the
    expected number of the group's other relevant items before it is (p-1)(r-1)/(n-1)
    (hypergeometric). AP is linear in those counts, so the group adds
        (r/n) * sum_{p=1..n} (b + 1 + (p-1) beta) / (a + p),   beta = (r-1)/(n-1)
      = (r/n) * [n beta + (b + 1 - beta (a + 1)) (H(a+n) - H(a))]
    to sum-of-precisions, with H the harmonic numbers; AP divides by R.
    """
    n = stats.counts_by_distance.astype(np.float64)
    r = stats.relevant_counts_by_distance().astype(np.float64)
    a = np.cumsum(stats.counts_by_distance, 1) - stats.counts_by_distance
    b = np.cumsum(r, 1) - r
    beta = (r - 1) / np.maximum(n - 1, 1)
    harmonic_span = harmonic[a + stats.counts_by_distance] - harmonic[a]
    group = n * beta + (b + 1 - beta * (a + 1)) * harmonic_span
    total = np.where(r > 0, r / np.maximum(n, 1) * group, 0.0).sum(1)
    num_relevant = r.sum(1)
    return np.where(num_relevant > 0, total / np.maximum(num_relevant, 1), 0.0)


def mean_average_precision(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    *,
    topk: int | None = None,
    tie_break: TieBreak = "index",
) -> float:
    """mAP of Hamming ranking (mAP@all when topk is None, else mAP@topk).

    query_codes: [Q, K], db_codes: [N, K] sign codes in {-1, +1} (int8 canonical) or packed uint8;
    query_labels: [Q], db_labels: [N] integer class ids. Relevance = same label.
    tie_break: "index" | "expected" | "semicon" (module docstring); "expected" is mAP@all only.
    Returns the mean over all Q queries (queries without relevant items count 0).
    """
    if tie_break not in ("index", "expected", "semicon"):
        raise ValueError(f"tie_break must be 'index', 'expected' or 'semicon', got {tie_break!r}")
    if topk is not None and (int(topk) != topk or topk < 1):
        raise ValueError(f"topk must be a positive integer or None, got {topk!r}")
    if tie_break == "expected" and topk is not None:
        raise ValueError("tie_break='expected' is defined for mAP@all only (topk=None)")
    statistics, num_query, num_db, _ = _ranking_statistics(
        query_codes, db_codes, query_labels, db_labels, include_unmatched=False
    )
    if num_query == 0:
        raise ValueError("no queries")
    if tie_break == "semicon" and topk is None:
        topk = num_db - 1
    harmonic = _harmonic_numbers(num_db) if tie_break == "expected" else None
    total = 0.0
    for stats in statistics:
        if tie_break == "expected":
            total += _expected_average_precision(stats, harmonic).sum()
        else:
            total += _topk_average_precision(stats.index_ranks(), topk).sum()
    return float(total / num_query)


def precision_at_k(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    k: int,
    tie_break: Literal["index", "expected"] = "index",
) -> float:
    """Mean over queries of (relevant items among the top k) / k.

    Codes and labels as in `mean_average_precision`. k larger than the database retrieves the whole
    database and divides by N. tie_break "index" ranks ties by database index; "expected" gives
    the expectation over random orders inside the tie that straddles rank k
    (relevant before it + r_tie * slots_left / n_tie).
    """
    if tie_break not in ("index", "expected"):
        raise ValueError(f"tie_break must be 'index' or 'expected', got {tie_break!r}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    statistics, num_query, num_db, _ = _ranking_statistics(
        query_codes, db_codes, query_labels, db_labels, include_unmatched=False
    )
    if num_query == 0:
        raise ValueError("no queries")
    k = min(int(k), num_db)
    total = 0.0
    for stats in statistics:
        if tie_break == "index":
            total += (stats.index_ranks() <= k).sum()
            continue
        cumulative = np.cumsum(stats.counts_by_distance, 1)
        straddling = np.argmax(cumulative >= k, axis=1)[:, None]  # distance of the k-th item
        before = np.take_along_axis(cumulative, straddling, 1)[:, 0]
        in_tie = np.take_along_axis(stats.counts_by_distance, straddling, 1)[:, 0]
        before -= in_tie
        relevant_before = (stats.relevant_distance < straddling).sum(1)
        relevant_in_tie = (stats.relevant_distance == straddling).sum(1)
        total += (relevant_before + relevant_in_tie * (k - before) / in_tie).sum()
    return float(total / (num_query * k))


def _radius_counts(stats: _RankingStatistics) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (retrieved [C, K+1], relevant retrieved [C, K+1], relevant in database [C]) by radius."""
    retrieved = np.cumsum(stats.counts_by_distance, 1)
    relevant_retrieved = np.cumsum(stats.relevant_counts_by_distance(), 1)
    return retrieved, relevant_retrieved, relevant_retrieved[:, -1]


def precision_recall_curve(
    query_codes: Any, db_codes: Any, query_labels: Any, db_labels: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Hash lookup PR curve over Hamming radii 0..K -> (precision `[K+1]`, recall `[K+1]`).

    At radius r every database item within distance r is retrieved. Per query, precision =
    relevant retrieved / retrieved (0 when nothing is retrieved), recall = relevant retrieved /
    relevant in the database (0 when the class is absent); both are averaged over all queries.
    Codes and labels as in `mean_average_precision` (K = 8 x bytes for packed codes).
    """
    statistics, num_query, _, bits = _ranking_statistics(
        query_codes, db_codes, query_labels, db_labels, include_unmatched=False
    )
    if num_query == 0:
        raise ValueError("no queries")
    precision, recall = np.zeros(bits + 1), np.zeros(bits + 1)
    for stats in statistics:
        retrieved, relevant_retrieved, relevant = _radius_counts(stats)
        precision += (relevant_retrieved / np.maximum(retrieved, 1)).sum(0)
        recall += (relevant_retrieved / np.maximum(relevant, 1)[:, None]).sum(0)
    return precision / num_query, recall / num_query


def precision_within_radius(
    query_codes: Any, db_codes: Any, query_labels: Any, db_labels: Any, radius: int = 2
) -> float:
    """Mean precision of hash lookup within Hamming radius `radius` (the field's "P@r=2").

    A query retrieving nothing within the radius counts precision 0 (the strict convention; some
    papers skip such queries, which rewards codes that retrieve nothing).
    """
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be a non-negative integer, got {radius!r}")
    precision, _ = precision_recall_curve(query_codes, db_codes, query_labels, db_labels)
    return float(precision[min(int(radius), len(precision) - 1)])
