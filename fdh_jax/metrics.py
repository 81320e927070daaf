"""Retrieval metrics for hash codes ranked by Hamming distance.

Protocol (DESIGN.md 1.3): every test image queries the whole database (the train split); a database
item is relevant when its label equals the query's label.

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

Algorithm. No sort: all queries of one class share their relevant set, so for a chunk of such
queries one jitted XLA kernel computes Hamming distances from packed words and a bin key
(query, relevant items preceding in index order, distance) per database item; one `np.bincount`
(a scatter-add on accelerators) gives, per query, how many database items lie at each distance
and how many of those precede each relevant item. A relevant item's rank is then
"items at smaller distance + items at equal distance with smaller index + 1". The database is
processed in blocks and the histograms are bounded by `_MAX_BINS`, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fdh_jax.retrieval import pack_query_and_database

TieBreak = Literal["index", "expected", "semicon"]

_MAX_BINS = 1 << 22  # histogram counters per chunk (x8 bytes)
_DB_BLOCK = 1 << 16  # database items per kernel call
_MAX_QUERY_CHUNK = 64  # queries per kernel call
_DEVICE_HISTOGRAM = False  # tests set True to run the accelerator path on CPU


@jax.jit
def _segment_keys(
    query_words: jax.Array,
    db_words: jax.Array,
    segment: jax.Array,
    num_segments: jax.Array,
    num_distances: jax.Array,
) -> jax.Array:
    """Histogram bin of every (query, database item).

    `query_words: [C, W]`, `db_words: [B, W]` uint32; `segment: [B]` int32 = number of relevant
    items before each database item in this block; scalars `num_segments` (relevant in block + 1),
    `num_distances` (K + 1) -> `[C, B]` int32 keys `(row * num_segments + segment) * (K+1) + dist`.
    """
    distance = lax.population_count(query_words[:, None, :] ^ db_words[None, :, :])
    distance = distance.astype(jnp.int32).sum(-1)
    row = jnp.arange(query_words.shape[0], dtype=jnp.int32)[:, None]
    return (row * num_segments + segment[None, :]) * num_distances + distance


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


def _block_statistics(
    keys: jax.Array, num_rows: int, num_bins: int, relevant_local: np.ndarray, num_distances: int
) -> tuple[np.ndarray, np.ndarray]:
    """(histogram [num_bins] int64, relevant distances [num_rows, R_b]) of one kernel call."""
    on_cpu = keys.devices() == {jax.devices("cpu")[0]} and not _DEVICE_HISTOGRAM
    if on_cpu:  # np.bincount beats XLA's CPU scatter by ~4x.
        host_keys = np.asarray(keys)[:num_rows]
        histogram = np.bincount(host_keys.ravel(), minlength=num_bins)
        return histogram, host_keys[:, relevant_local] % num_distances
    # Sizes padded to powers of two so that few shapes compile.
    padded_bins = 1 << max(num_bins - 1, 1).bit_length()
    histogram = _scatter_histogram(keys, num_rows, padded_bins)
    padded_index = np.zeros(1 << max(len(relevant_local) - 1, 0).bit_length(), np.int32)
    padded_index[: len(relevant_local)] = relevant_local
    distances = np.asarray(keys[:, padded_index] % num_distances)
    return (
        np.asarray(histogram)[:num_bins].astype(np.int64),
        distances[:num_rows, : len(relevant_local)].astype(np.int64),
    )


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
        _iterate_statistics(
            query_words, db_words, bits, query_labels, db_labels, include_unmatched
        ),
        num_query,
        num_db,
        bits,
    )


def _iterate_statistics(
    query_words: np.ndarray,
    db_words: np.ndarray,
    bits: int,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    include_unmatched: bool,
) -> Iterator[_RankingStatistics]:
    num_db = db_words.shape[0]
    num_distances = bits + 1
    block = min(num_db, _DB_BLOCK)
    block_starts = list(range(0, num_db, block))
    db_blocks = [jnp.asarray(db_words[start : start + block]) for start in block_starts]

    classes, query_class = np.unique(query_labels, return_inverse=True)
    query_order = np.argsort(query_class, kind="stable")
    query_bounds = np.searchsorted(query_class[query_order], np.arange(len(classes) + 1))

    def launched_tasks() -> Iterator[tuple]:
        """Yields kernel calls already dispatched (XLA runs them while the host bins the last)."""
        for c, label in enumerate(classes):
            is_relevant = db_labels == label
            if not include_unmatched and not is_relevant.any():
                continue
            relevant_before = np.cumsum(is_relevant) - is_relevant  # [N]
            per_block = [int(is_relevant[s : s + block].sum()) for s in block_starts]
            bins_per_query = (max(per_block) + 1) * num_distances
            rows = max(1, min(_MAX_QUERY_CHUNK, _MAX_BINS // bins_per_query))
            queries = query_order[query_bounds[c] : query_bounds[c + 1]]
            for q0 in range(0, len(queries), rows):
                chunk = queries[q0 : q0 + rows]
                padded_rows = 1 << (len(chunk) - 1).bit_length()
                chunk_words = np.zeros((padded_rows, query_words.shape[1]), np.uint32)
                chunk_words[: len(chunk)] = query_words[chunk]
                for b, start in enumerate(block_starts):
                    segment = relevant_before[start : start + block] - relevant_before[start]
                    relevant_local = np.flatnonzero(is_relevant[start : start + block])
                    keys = _segment_keys(
                        chunk_words,
                        db_blocks[b],
                        segment.astype(np.int32),
                        np.int32(per_block[b] + 1),
                        np.int32(num_distances),
                    )
                    yield chunk, b, per_block[b], relevant_local, keys

    state: dict[str, Any] = {}

    def consume(task: tuple) -> _RankingStatistics | None:
        chunk, b, relevant_in_block, relevant_local, keys = task
        rows = len(chunk)
        if b == 0:
            state["counts"] = np.zeros((rows, num_distances), np.int64)
            state["distances"], state["ties"] = [], []
        segments = relevant_in_block + 1
        histogram, distance = _block_statistics(
            keys, rows, rows * segments * num_distances, relevant_local, num_distances
        )
        histogram = histogram.reshape(rows, segments, num_distances)
        if relevant_in_block:
            # Items at the relevant item's distance, up to and including it, in this block.
            upto = np.cumsum(histogram[:, :relevant_in_block], axis=1)
            within = np.take_along_axis(upto, distance[:, :, None], 2)[:, :, 0] - 1
            earlier = np.take_along_axis(state["counts"], distance, 1)
            state["distances"].append(distance)
            state["ties"].append(earlier + within)
        state["counts"] += histogram.sum(1)
        if b < len(block_starts) - 1:
            return None
        empty = np.zeros((rows, 0), np.int64)
        return _RankingStatistics(
            query_index=chunk,
            counts_by_distance=state["counts"],
            relevant_distance=np.concatenate(state["distances"], 1)
            if state["distances"]
            else empty,
            tie_before=np.concatenate(state["ties"], 1) if state["ties"] else empty,
        )

    previous = None
    for task in launched_tasks():
        if previous is not None and (stats := consume(previous)) is not None:
            yield stats
        previous = task
    if previous is not None and (stats := consume(previous)) is not None:
        yield stats


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
