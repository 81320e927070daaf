"""Exact top-k search by a linear scan: every database code is compared with every query.

Distances run as jitted XLA over packed 32-bit words (`population_count` of XORs), so they use an
accelerator when JAX has one. Exact top-k search runs on an accelerator as XLA, on CPU as a numba
kernel (vector popcounts, no sort); every search is chunked so memory stays bounded for any
database. `fdh_jax.search.multi_index.MultiIndexHashing` answers the same top-k sub-linearly.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numba import njit, prange

from fdh_jax.search.bits import (
    SUB_BLOCK,
    count_closer,
    kth_smallest,
    pack_query_and_database,
    widen_words,
    word_distance,
    word_hamming_distance,
)


def _query_chunk(num_db: int, max_elements: int = 1 << 23, max_rows: int = 256) -> int:
    """A power-of-two query chunk so that chunk x num_db stays under max_elements."""
    rows = max(1, min(max_rows, max_elements // max(num_db, 1)))
    return 1 << (rows.bit_length() - 1)


def hamming_distance(query_codes: Any, db_codes: Any) -> np.ndarray:
    """Pairwise Hamming distances. `query_codes: [Q, K]`, `db_codes: [N, K]` -> `[Q, N]` int32.

    Accepts sign codes or packed uint8 codes (see `fdh_jax.search.bits`).
    """
    query_words, db_words, _ = pack_query_and_database(query_codes, db_codes)
    out = np.empty((query_words.shape[0], db_words.shape[0]), np.int32)
    chunk = _query_chunk(db_words.shape[0])
    db_device = jnp.asarray(db_words)
    for start in range(0, query_words.shape[0], chunk):
        rows = query_words[start : start + chunk]
        out[start : start + len(rows)] = np.asarray(word_hamming_distance(rows, db_device))
    return out


# CPU linear scan (`scan_topk`): a numba kernel over 64-bit words. The XLA CPU backend neither
# vectorises population_count nor compacts a mask cheaply (a count-only XLA pass over 1,000 x
# 1,000,000 codes took 2.5 s, faiss's whole search 0.32 s), so the CPU path is compiled by LLVM
# through numba, which turns the inner loop into vector popcounts.
_SCAN_BLOCK = 2048  # database items per tile: 16 KiB of 64-bit codes, reused from L1 by a group
_SCAN_GROUP = 16  # queries per tile and per parallel task
_SCAN_GROUP_BYTES = 1 << 24  # bound on a group's candidate buffers (matters only for huge k)
# Accelerator path (`_device_topk`): per block `lax.top_k` merged by `lax.sort`.
_TOPK_BLOCK = 1 << 20  # database items per kernel call
_TOPK_MAX_MASK = 1 << 26  # query rows x block items per kernel call
_DEVICE_TOPK = False  # tests set True to run the accelerator path on CPU


@njit(inline="always")
def _keep_first_k(histogram, kept_distances, kept_indices, count, k):
    """Shrinks a query's count > k candidates, held in database order, to its k best by
    (distance, index): all below the k-th distance t, then the first ones at t. Returns k."""
    t = kth_smallest(histogram, k)
    below = 0
    for d in range(t):
        below += histogram[d]
    room = k - below  # places left for candidates at distance t, taken in database order
    kept = 0
    for p in range(count):
        d = kept_distances[p]
        if d < t or (d == t and room > 0):
            if d == t:
                room -= 1
            kept_distances[kept] = d
            kept_indices[kept] = kept_indices[p]
            kept += 1
    histogram[t] = k - below
    histogram[t + 1 :] = 0
    return kept


@njit(parallel=True, cache=True)
def _scan_topk_kernel(query_words, db_columns, k, bits, block, group, out_distances, out_indices):
    """Exact top-k by (distance, index) in one pass over the database, no sort.

    `query_words: [Q, W]`, `db_columns: [W, N]` uint64; writes `out_*: [Q, k]` int32. Tiles of
    `group` queries x `block` items keep the codes in L1. Per query, the candidates kept so far are
    in database order with a histogram of their distances; its k-th distance t bounds the rest:
    a later item at distance t ranks after the k earlier ones at distance <= t, so only distances
    < t are counted (vector loop) and re-read (only in sub-blocks that counted any).

    Over 60 lines: one numba kernel (a `prange` over query groups) whose per-group buffers live
    across its loops; the self-contained steps are helpers (`count_closer`, `_keep_first_k`).
    """
    num_query, num_db = query_words.shape[0], db_columns.shape[1]
    capacity = k + block  # room for one block of candidates after shrinking to k
    for g in prange((num_query + group - 1) // group):
        first = g * group
        rows = min(num_query, first + group) - first
        histogram = np.zeros((rows, bits + 1), np.int64)
        kept_distances = np.empty((rows, capacity), np.int32)
        kept_indices = np.empty((rows, capacity), np.int32)
        kept = np.zeros(rows, np.int64)
        bound = np.full(rows, bits + 1, np.int64)  # keep distances < bound; all until k are kept
        sub_counts = np.zeros((block + SUB_BLOCK - 1) // SUB_BLOCK, np.int64)
        scratch = np.empty(SUB_BLOCK, np.int64)
        for start in range(0, num_db, block):
            stop = min(num_db, start + block)
            for r in range(rows):
                query, t = query_words[first + r], bound[r]
                hits = 0
                for s in range(start, stop, SUB_BLOCK):
                    end = min(stop, s + SUB_BLOCK)
                    found = count_closer(query, db_columns, s, end, t, scratch)
                    sub_counts[(s - start) // SUB_BLOCK] = found
                    hits += found
                if hits == 0:
                    continue
                count = kept[r]
                if count + hits > capacity:
                    count = _keep_first_k(
                        histogram[r], kept_distances[r], kept_indices[r], count, k
                    )
                for s in range(start, stop, SUB_BLOCK):
                    if sub_counts[(s - start) // SUB_BLOCK] == 0:
                        continue
                    for j in range(s, min(stop, s + SUB_BLOCK)):
                        d = word_distance(query, db_columns, j)
                        if d < t:
                            kept_distances[r, count] = d
                            kept_indices[r, count] = j
                            histogram[r, d] += 1
                            count += 1
                kept[r] = count
                if count >= k:
                    bound[r] = kth_smallest(histogram[r], k)
        for r in range(rows):
            # A stable counting sort by distance of the candidates (in database order) that make
            # the top k: ascending distance, ties by index.
            t = kth_smallest(histogram[r], k)
            position = np.zeros(t + 1, np.int64)
            for d in range(1, t + 1):
                position[d] = position[d - 1] + histogram[r, d - 1]
            for p in range(kept[r]):
                d = kept_distances[r, p]
                if d <= t and position[d] < k:
                    out_distances[first + r, position[d]] = d
                    out_indices[first + r, position[d]] = kept_indices[r, p]
                    position[d] += 1


def scan_topk(
    query_words: np.ndarray, db_columns: np.ndarray, k: int, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """`query_words: [Q, W]`, `db_columns: [W, N]` uint64, 1 <= k <= N -> (`[Q, k]` int32 x 2)."""
    num_query = query_words.shape[0]
    out_distances = np.empty((num_query, k), np.int32)
    out_indices = np.empty((num_query, k), np.int32)
    per_query = 8 * (k + _SCAN_BLOCK)  # candidate buffer bytes
    group = max(1, min(_SCAN_GROUP, _SCAN_GROUP_BYTES // per_query))
    _scan_topk_kernel(
        np.ascontiguousarray(query_words),
        np.ascontiguousarray(db_columns),
        k,
        bits,
        _SCAN_BLOCK,
        group,
        out_distances,
        out_indices,
    )
    return out_distances, out_indices


@partial(jax.jit, static_argnames=("k",))
def _merge_block_topk(
    best_distances: jax.Array,
    best_indices: jax.Array,
    query_words: jax.Array,
    db_words: jax.Array,
    start: jax.Array,
    k: int,
) -> tuple[jax.Array, jax.Array]:
    """Accelerator step: top-k of one database block by (distance, index), merged into the best
    so far. `best_*: [C, k]` int32, `query_words: [C, W]`, `db_words: [B, W]` -> `[C, k]` x 2."""
    distances = word_hamming_distance(query_words, db_words)
    block = db_words.shape[0]
    local = jnp.arange(block, dtype=jnp.int32)
    _, position = lax.top_k(-(distances * block + local[None, :]), min(k, block))
    block_distances = jnp.take_along_axis(distances, position, 1)
    merged = lax.sort(
        (
            jnp.concatenate([best_distances, block_distances], 1),
            jnp.concatenate([best_indices, position + start], 1),
        ),
        dimension=1,
        num_keys=2,
    )
    return merged[0][:, :k], merged[1][:, :k]


def _device_topk(query_words: np.ndarray, db_words: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    num_query, num_db = query_words.shape[0], db_words.shape[0]
    block = min(num_db, _TOPK_BLOCK)
    chunk = 1 << (max(1, min(256, _TOPK_MAX_MASK // block)).bit_length() - 1)
    db_device = [jnp.asarray(db_words[s : s + block]) for s in range(0, num_db, block)]
    sentinel = np.iinfo(np.int32).max  # loses every comparison; replaced by the first block
    out_distances, out_indices = [], []
    for q0 in range(0, num_query, chunk):
        chunk_words = np.zeros((chunk, query_words.shape[1]), np.uint32)
        rows = min(chunk, num_query - q0)
        chunk_words[:rows] = query_words[q0 : q0 + rows]
        best = (
            jnp.full((chunk, k), sentinel, jnp.int32),
            jnp.full((chunk, k), sentinel, jnp.int32),
        )
        for b, db_block in enumerate(db_device):
            best = _merge_block_topk(*best, chunk_words, db_block, np.int32(b * block), k=k)
        out_distances.append(np.asarray(best[0])[:rows])
        out_indices.append(np.asarray(best[1])[:rows])
    return np.concatenate(out_distances), np.concatenate(out_indices)


def hamming_topk(query_codes: Any, db_codes: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest database codes by Hamming distance, ties broken by database index.

    `query_codes: [Q, K]`, `db_codes: [N, K]` sign codes or packed uint8; 1 <= k <= N ->
    (`distances: [Q, k]` int32 ascending, `indices: [Q, k]` int32). Chunked over queries and the
    database. On CPU: threshold streaming with no sort of the database; on an accelerator: per
    block `lax.top_k` merged by `lax.sort`.
    """
    query_words, db_words, bits = pack_query_and_database(query_codes, db_codes)
    if int(k) != k or not 1 <= k <= db_words.shape[0]:
        raise ValueError(
            f"k must be an integer in [1, {db_words.shape[0]}] (database size), got {k}"
        )
    k = int(k)
    if query_words.shape[0] == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.int32)
    if jax.default_backend() == "cpu" and not _DEVICE_TOPK:
        return scan_topk(widen_words(query_words), widen_words(db_words).T, k, bits)
    return _device_topk(query_words, db_words, k)


# Databases from this size on are worth a MultiIndexHashing: below it a linear scan of all queries
