"""Exact sub-linear Hamming search: multi-index hashing (MIH).

Norouzi, Punjani and Fleet, "Fast exact search in Hamming space with multi-index hashing"
(CVPR 2012, TPAMI 2014). A K-bit code is cut into m disjoint substrings of floor(K/m) or
ceil(K/m) bits, and each substring indexes one hash table (bucket = substring value). If two codes
differ in at most r = m * rho + a bits (0 <= a < m), then by pigeonhole one of the first a + 1
substrings differs in at most rho bits, or one of the others in at most rho - 1. So after probing,
for every table, the buckets within radius rho - 1 of the query's substring, and for tables
0..i also those at radius exactly rho, every code within distance m * rho + i has been seen. The
search probes in that order and stops once the k-th best distance seen is <= that certified
radius: every code that can enter the top k, ties at the k-th distance included, has then been
verified with its full distance, so the result is exactly the brute-force one (ties by database
index). A query whose probing grows past a work budget (the linear scan would be cheaper) is
answered by the linear scan instead; see `MultiIndexHashing.search`.

A mask of live items (`search(..., alive=mask)`, for a collection whose older items are indexed
while some are removed) makes the search exact over the live items only: dead codes are skipped
where they are verified, so they never enter the candidates nor the k-th distance, and every live
code within the certified radius is still probed. Over-budget queries scan the live codes.

Range search (`MultiIndexHashing.pairs_within`): all pairs within a radius r = m * rho + a agree
within rho bits on one of the first a + 1 substrings or within rho - 1 on one of the others, so
probing those balls around each item's substrings finds every pair; a pair is kept only through
the first table where it agrees so, hence emitted once. `range_probe_cost` gives the probes per
item, for choosing between it and an all-pairs scan.

Tables are compact: per table the database ids sorted by substring value (uint32, stable, so a
bucket lists ids in ascending order) and the bucket boundaries, as a dense array of 2^s + 1
offsets when that is small (2^s <= 4 N, or s <= 16), else as the sorted distinct values with their
offsets (binary search per probe).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fdh_jax.common.checksums import load_checked_npz, save_checked_npz
from fdh_jax.search.bits import (
    SUB_BLOCK,
    IndexFileError,
    InvalidCodesError,
    count_closer,
    kth_smallest,
    pack_words64,
    popcount,
    word_distance,
)
from fdh_jax.search.scan import scan_topk

MIH_FORMAT_VERSION = 1
_MAX_SUBSTRING_BITS = 32  # beyond this a table's radius balls are too large to enumerate
# Work per query is counted in linear-scan items (the scan spends ~ 0.3 ns of one core per database
# item): a probe of an empty or full bucket is a random memory access, ~ _PROBE_COST items; a
# bucket entry is read in a vector pass, ~ _ENTRY_COST items. A query whose work passes
# _WORK_PER_ITEM x N is answered by the linear scan instead. These costs are estimates from runs on
# a loaded 2-core VM; `python benchmarks/search.py --mode=sweep` measures the break-even.
_PROBE_COST = 256
_ENTRY_COST = 2
_WORK_PER_ITEM = 0.5
# `search` answers this many queries by probing first; if more than half of them exceed the
# budget (codes without neighbourhood structure, e.g. uniform random bits) the rest go straight
# to the linear scan, so MIH costs at most about this many wasted budgets on such data.
_PILOT_QUERIES = 32
# Buckets looked up per batch, and how far ahead (in buckets) and how deep (in cache lines) their
# codes are prefetched while the current bucket is verified (measured on 10M clustered codes).
_PROBE_BATCH = 64
_PREFETCH_AHEAD = 2
_PREFETCH_LINES = 16


def default_num_tables(num_db: int, bits: int) -> int:
    """m = round(K / min(log2 N, 16)): substrings of about log2 N bits as in Norouzi et al., but
    at most about 16. Buckets are verified with a vector pass (a fraction of a ns per entry) while
    each probe is a cache miss, so fewer, fuller buckets pay: on 10M clustered 64-bit codes (a
    loaded 2-core VM), 4 tables answered in 40% of the time of 3 (log2 N = 23) and 30-75% of that
    of 5. Clamped to
    [1, K] and to substrings of at most 32 bits."""
    m = round(bits / min(math.log2(max(num_db, 2)), 16))
    return int(min(bits, max(m, 1, -(-bits // _MAX_SUBSTRING_BITS))))


def substring_bounds(bits: int, num_tables: int) -> np.ndarray:
    """`[m + 1]` int64 bit boundaries: substring i is code bits [b[i], b[i+1]); the first K mod m
    substrings have ceil(K/m) bits, the others floor(K/m)."""
    lengths = np.full(num_tables, bits // num_tables, np.int64)
    lengths[: bits % num_tables] += 1
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _substring_values(words: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Bits [start, stop) of each code as an integer (first bit most significant).

    `words: [N, W]` uint64 in the `pack_words64` layout -> `[N]` int64, for stop - start <= 32.
    """
    # Byte-swapped, a word holds its 64 code bits in order from the most significant bit.
    ordered = words.byteswap()
    value = np.zeros(len(words), np.uint64)
    for w in range(start // 64, (stop - 1) // 64 + 1):
        lo, hi = max(start, 64 * w), min(stop, 64 * w + 64)
        piece = (ordered[:, w] >> np.uint64(64 * w + 64 - hi)) & np.uint64((1 << (hi - lo)) - 1)
        value = (value << np.uint64(hi - lo)) | piece
    return value.astype(np.int64)


def _substring_masks(bounds: np.ndarray, num_words: int) -> np.ndarray:
    """`[m, W]` uint64: per table, the bits of its substring in the `pack_words64` layout."""
    bits = int(bounds[-1])
    inside = np.zeros((len(bounds) - 1, bits), np.int8) - 1
    for i in range(len(bounds) - 1):
        inside[i, bounds[i] : bounds[i + 1]] = 1
    masks = pack_words64(inside)[0]
    return np.ascontiguousarray(masks[:, :num_words])


@njit(cache=True)
def _counting_sort(values: np.ndarray, num_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable bucket order in O(N). `values: [N]` int64 in [0, num_buckets) -> (ids `[N]` uint32
    sorted by value, ascending within a value; offsets `[num_buckets + 1]` uint32)."""
    starts = np.zeros(num_buckets + 1, np.int64)
    for v in values:
        starts[v + 1] += 1
    for b in range(num_buckets):
        starts[b + 1] += starts[b]
    fill = starts[:-1].copy()
    order = np.empty(values.shape[0], np.uint32)
    for j in range(values.shape[0]):
        order[fill[values[j]]] = j
        fill[values[j]] += 1
    return order, starts.astype(np.uint32)


@njit(inline="always")
def _bucket(table, value, dense, bucket_base, bucket_starts, key_base, keys):  # noqa: ANN001, ANN202
    """Positions [lo, hi) in sorted_ids[table] of the codes whose substring equals value."""
    if dense[table]:
        at = bucket_base[table] + value
        return np.int64(bucket_starts[at]), np.int64(bucket_starts[at + 1])
    lo, hi = key_base[table], key_base[table + 1]
    while lo < hi:  # binary search for value among the table's sorted distinct substrings
        mid = (lo + hi) // 2
        if keys[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    if lo == key_base[table + 1] or keys[lo] != value:
        return np.int64(0), np.int64(0)
    at = bucket_base[table] + lo - key_base[table]
    return np.int64(bucket_starts[at]), np.int64(bucket_starts[at + 1])


@intrinsic
def _prefetch(typingctx, array, index):  # noqa: ANN001, ANN202
    """Asks the CPU to bring `array[index]` into cache (LLVM's prefetch: read, high locality);
    no effect on results. `array`: a 1-D contiguous array, `index` int64 inside it."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        pointer = builder.gep(data, [args[1]])
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [pointer.type, i32, i32, i32]),
            "llvm.prefetch.p0",
        )
        builder.call(function, [pointer, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, types.int64), codegen


@njit(inline="always")
def _prefetch_bucket(codes, lo, hi):  # noqa: ANN001, ANN202
    """Requests the cache lines of the first `_PREFETCH_LINES` lines of codes[:, lo:hi]."""
    stop = min(hi, lo + 8 * _PREFETCH_LINES)
    for w in range(codes.shape[0]):
        row = codes[w]
        for position in range(lo, stop, 8):  # 8 uint64 per 64-byte cache line
            _prefetch(row, position)


@njit(inline="always")
def _seen_earlier(query, codes, p, masks, table, rho):  # noqa: ANN001, ANN202
    """Whether code p of `table`'s bucket at radius exactly rho was already verified: iff an
    earlier table is within rho of the query or a later one within rho - 1."""
    for other in range(masks.shape[0]):
        if other == table:
            continue
        part = 0
        for w in range(query.shape[0]):
            part += popcount((query[w] ^ codes[w, p]) & masks[other, w])
        if part < rho or (part == rho and other < table):
            return True
    return False


@njit(inline="always")
def _make_room(found_distances, found_indices, count, capacity, keep):  # noqa: ANN001, ANN202
    """A full candidate buffer: drops what the k-th best now excludes; doubles the buffer if
    ties keep it more than half full. -> (distances, indices, count, capacity)."""
    kept = 0
    for c in range(count):
        if found_distances[c] <= keep:
            found_distances[kept] = found_distances[c]
            found_indices[kept] = found_indices[c]
            kept += 1
    if kept > capacity // 2:
        capacity *= 2
        grown_distances = np.empty(capacity, np.int32)
        grown_indices = np.empty(capacity, np.int32)
        grown_distances[:kept] = found_distances[:kept]
        grown_indices[:kept] = found_indices[:kept]
        return grown_distances, grown_indices, kept, capacity
    return found_distances, found_indices, kept, capacity


@njit(inline="always")
def _next_buckets(  # noqa: ANN202
    table, substring, mask, limit, rho, ranges, dense, bucket_base, bucket_starts, key_base, keys
):
    """Bounds of the next buckets of `table` at radius exactly rho from `substring`, at most
    `_PROBE_BATCH`, into `ranges[:filled]`. The rho-bit masks of the table's `log2(limit)` bits
    are enumerated in order from `mask` (Gosper's hack). Returns (filled, the next mask)."""
    filled = 0
    while mask < limit and filled < _PROBE_BATCH:
        lo, hi = _bucket(table, substring ^ mask, dense, bucket_base, bucket_starts, key_base, keys)
        ranges[filled, 0], ranges[filled, 1] = lo, hi
        filled += 1
        if rho == 0:
            mask = limit
        else:
            lowest = mask & -mask
            ripple = mask + lowest
            mask = (((ripple ^ mask) >> 2) // lowest) | ripple
    return filled, mask


@njit(inline="always")
def _is_dead(alive, index):  # noqa: ANN001, ANN202
    """Whether database item `index` is dead in the bit mask `alive` (`np.packbits(mask,
    bitorder="little")`: 1 bit per item, so that 10M items take 1.25 MB and stay in cache);
    an empty mask: every item is live."""
    return alive.shape[0] != 0 and (alive[index >> 3] >> (index & 7)) & 1 == 0


@njit(inline="always")
def _verify_bucket(query, codes, lo, hi, table, rho, masks, sorted_ids, alive, k, state):  # noqa: ANN001, ANN202
    """Verifies the codes `codes[:, lo:hi]` of one bucket of `table`: each live one within the
    k-th best distance so far and not seen in an earlier probe joins the candidates. `alive`:
    the bit mask of `_is_dead` (dead items are never candidates), empty when all are live. `state`
    is the query's `(found_distances, found_indices, count, capacity, keep, histogram, scratch)`;
    returns it updated (a full candidate buffer is replaced by a larger one)."""
    found_distances, found_indices, count, capacity, keep, histogram, scratch = state
    for start in range(lo, hi, SUB_BLOCK):
        # A vector pass first: most codes in a bucket are too far to matter.
        stop = min(hi, start + SUB_BLOCK)
        if count_closer(query, codes, start, stop, keep + 1, scratch) == 0:
            continue
        for p in range(start, stop):
            distance = word_distance(query, codes, p)
            if distance > keep:
                continue
            # Dead items are looked up only here, for codes within the k-th distance: the
            # unmasked search pays one predictable branch per such code, nothing per entry.
            if _is_dead(alive, sorted_ids[table, p]):
                continue
            if _seen_earlier(query, codes, p, masks, table, rho):
                continue
            if count == capacity:
                found_distances, found_indices, count, capacity = _make_room(
                    found_distances, found_indices, count, capacity, keep
                )
            found_distances[count] = distance
            found_indices[count] = sorted_ids[table, p]
            histogram[distance] += 1
            count += 1
            if count >= k:
                keep = kth_smallest(histogram, k)
    return found_distances, found_indices, count, capacity, keep, histogram, scratch


@njit(inline="always")
def _write_top_k(state, k, out_distances, out_indices):  # noqa: ANN001, ANN202
    """Orders the candidates at distance <= keep (every code there was seen) by (distance,
    index) and writes the first k into `out_distances`, `out_indices` (`[k]` int32)."""
    found_distances, found_indices, count, _, keep, _, _ = state
    order_keys = np.empty(count, np.int64)
    selected = 0
    for c in range(count):
        if found_distances[c] <= keep:
            order_keys[selected] = (np.int64(found_distances[c]) << 32) | found_indices[c]
            selected += 1
    order_keys = np.sort(order_keys[:selected])
    for c in range(k):
        out_distances[c] = order_keys[c] >> 32
        out_indices[c] = order_keys[c] & 0xFFFFFFFF


@njit(cache=True)
def _mih_query(  # noqa: ANN202
    query,  # [W] uint64
    substrings,  # [m] int64: the query's substring values
    sorted_codes,  # [m, W, N] uint64: per table, the codes in bucket order
    masks,  # [m, W] uint64: each substring's bits
    lengths,  # [m] int64
    sorted_ids,  # [m, N] uint32
    dense,  # [m] bool
    bucket_base,  # [m + 1] int64
    bucket_starts,  # [sum of bucket counts + m] uint32
    key_base,  # [m + 1] int64
    keys,  # [sum of sparse tables' distinct values] int64
    alive,  # [ceil(N / 8)] uint8, 1 bit per database id (`_is_dead`), or empty: all live
    k,
    bits,
    budget,
    out_distances,  # [k] int32
    out_indices,  # [k] int32
):
    """One query's MIH search (module docstring). Writes its top k unless it runs over budget.
    Returns (over budget, certified radius m * rho + table reached, work = probes + entries).

    The buckets of a table at radius rho are looked up a batch at a time (`_next_buckets`):
    their bounds first, then their codes (`_verify_bucket`), with the codes of the bucket
    `_PREFETCH_AHEAD` places on requested from memory while this one is verified (each bucket is
    a cache miss: without that the scan waited on memory 3/4 of the time, benchmarks/search.py
    --mode mih)."""
    num_tables = masks.shape[0]
    capacity = max(2 * k, 256)
    # Candidates, their distance histogram and keep, the k-th best distance so far (all <= keep
    # are kept; every distance until k are found).
    state = (
        np.empty(capacity, np.int32),
        np.empty(capacity, np.int32),
        0,
        capacity,
        bits,
        np.zeros(bits + 1, np.int64),
        np.empty(SUB_BLOCK, np.int64),
    )
    work = 0
    certified = -1
    ranges = np.empty((_PROBE_BATCH, 2), np.int64)
    for rho in range(lengths.min() + 1):
        for table in range(num_tables):
            codes = sorted_codes[table]
            mask, limit = (1 << rho) - 1, 1 << lengths[table]
            while mask < limit and work <= budget:
                filled, mask = _next_buckets(
                    table, substrings[table], mask, limit, rho, ranges, dense, bucket_base,
                    bucket_starts, key_base, keys,
                )  # fmt: skip
                for b in range(min(_PREFETCH_AHEAD, filled)):
                    _prefetch_bucket(codes, ranges[b, 0], ranges[b, 1])
                for b in range(filled):
                    if b + _PREFETCH_AHEAD < filled:
                        ahead = b + _PREFETCH_AHEAD
                        _prefetch_bucket(codes, ranges[ahead, 0], ranges[ahead, 1])
                    lo, hi = ranges[b, 0], ranges[b, 1]
                    work += _PROBE_COST + _ENTRY_COST * (hi - lo)
                    state = _verify_bucket(
                        query, codes, lo, hi, table, rho, masks, sorted_ids, alive, k, state
                    )
                    if work > budget:
                        break
            if work > budget:
                return True, certified, work
            certified = num_tables * rho + table
            if state[2] >= k and state[4] <= certified:
                _write_top_k(state, k, out_distances, out_indices)
                return False, certified, work
    # Leaving the loops without a certificate means a table was probed at every radius up to
    # its length, i.e. every code was seen: the result is exact then too.
    _write_top_k(state, k, out_distances, out_indices)
    return False, certified, work


@njit(parallel=True, cache=True)
def _mih_kernel(  # noqa: ANN202
    query_words, query_substrings, tables, alive, k, bits, budget, distances, indices, over, radius,
    work,
):  # fmt: skip
    """`_mih_query` for every row of `query_words: [Q, W]`, in parallel over queries.
    `tables`: the index arrays in `_mih_query`'s order; `alive`: bit mask (`_is_dead`) or empty.
    Writes distances, indices `[Q, k]` int32, over budget `[Q]` bool, certified radius `[Q]` and
    work `[Q]` int64."""
    for q in prange(query_words.shape[0]):
        # Outputs are separate arguments: in numba 0.68 writes inside a prange loop to arrays
        # unpacked from a tuple argument are lost.
        result = _mih_query(
            query_words[q], query_substrings[q], *tables, alive, k, bits, budget, distances[q],
            indices[q],
        )  # fmt: skip
        over[q] = result[0]
        radius[q] = result[1]
        work[q] = result[2]


@njit(inline="always")
def _found_earlier(query, codes, p, masks, table, thresholds):  # noqa: ANN001, ANN202
    """Whether code p of `table`'s codes is within its threshold of the query on an earlier
    table's substring: the pair was then found (and emitted) through that table."""
    for other in range(table):
        part = 0
        for w in range(query.shape[0]):
            part += popcount((query[w] ^ codes[w, p]) & masks[other, w])
        if part <= thresholds[other]:
            return True
    return False


@njit(inline="always")
def _range_bucket(  # noqa: ANN202
    i, query, codes, lo, hi, table, sorted_ids, masks, thresholds, radius, alive, out
):  # noqa: ANN001
    """Pairs (i, j) from the bucket `codes[:, lo:hi]` of `table`: j > i, live, within `radius`
    and not within an earlier table's threshold. `out`: `(seconds, distances, at, write, scratch)`
    with `at` the next place; the pairs are written there when `write`. -> the next place."""
    seconds, distances, at, write, scratch = out
    # A bucket lists its ids in ascending order: those after i are a suffix.
    lo += np.searchsorted(sorted_ids[table, lo:hi], np.uint32(i), side="right")
    for start in range(lo, hi, SUB_BLOCK):
        stop = min(hi, start + SUB_BLOCK)
        if count_closer(query, codes, start, stop, radius + 1, scratch) == 0:
            continue
        for p in range(start, stop):
            distance = word_distance(query, codes, p)
            if distance > radius:
                continue
            j = sorted_ids[table, p]
            if _is_dead(alive, j):
                continue
            if _found_earlier(query, codes, p, masks, table, thresholds):
                continue
            if write:
                seconds[at], distances[at] = j, distance
            at += 1
    return at


@njit(inline="always")
def _range_item(i, query, substrings, tables, thresholds, radius, alive, ranges, out):  # noqa: ANN001, ANN202
    """Every pair (i, j) of `_range_bucket` over the buckets within each table's threshold of
    item i's substring (radius 0, 1, ... up to the threshold, Gosper's hack within a radius).
    `out` as in `_range_bucket`; -> the next place after i's pairs."""
    sorted_codes, masks, lengths, sorted_ids, dense, bucket_base, bucket_starts, key_base, keys = (
        tables
    )
    seconds, distances, at, write, scratch = out
    for table in range(masks.shape[0]):
        codes, limit = sorted_codes[table], 1 << lengths[table]
        for rho in range(min(thresholds[table], lengths[table]) + 1):
            mask = (1 << rho) - 1
            while mask < limit:
                filled, mask = _next_buckets(
                    table, np.int64(substrings[table, i]), mask, limit, rho, ranges, dense,
                    bucket_base, bucket_starts, key_base, keys,
                )  # fmt: skip
                for b in range(filled):
                    at = _range_bucket(
                        i, query, codes, ranges[b, 0], ranges[b, 1], table, sorted_ids, masks,
                        thresholds, radius, alive, (seconds, distances, at, write, scratch),
                    )  # fmt: skip
    return at


@njit(parallel=True, cache=True)
def _range_kernel(  # noqa: ANN202
    db_columns, substrings, tables, thresholds, radius, alive, write, starts, seconds, distances
):
    """`_range_item` for every live item, in parallel. Counting pass (`write` False): writes
    item i's number of pairs into `starts[i]`. Writing pass: `starts: [N + 1]` the prefix sums;
    writes item i's partners and distances into `seconds`, `distances[starts[i]:starts[i + 1]]`,
    ordered by partner. `substrings: [m, N]` uint32, each item's substring values."""
    num_db, num_words = db_columns.shape[1], db_columns.shape[0]
    # Items are dealt round-robin to the tasks: an item with a low id has more partners j > i.
    num_tasks = min(num_db, 1024)
    for task in prange(num_tasks):
        ranges = np.empty((_PROBE_BATCH, 2), np.int64)
        scratch = np.empty(SUB_BLOCK, np.int64)
        query = np.empty(num_words, np.uint64)
        for i in range(task, num_db, num_tasks):
            if _is_dead(alive, i):
                continue
            for w in range(num_words):
                query[w] = db_columns[w, i]
            at = starts[i] if write else 0
            out = (seconds, distances, at, write, scratch)
            stop = _range_item(i, query, substrings, tables, thresholds, radius, alive, ranges, out)
            if not write:
                starts[i] = stop
                continue
            order = np.argsort(seconds[at:stop])
            seconds[at:stop] = seconds[at:stop][order]
            distances[at:stop] = distances[at:stop][order]


class MultiIndexHashing:
    """Exact k-nearest-neighbour search in Hamming space with multi-index hashing.

    `MultiIndexHashing(db_codes)`: `db_codes: [N, K]` sign codes in {-1, +1} (or packed uint8,
    see `fdh_jax.search.bits`); `num_tables` m defaults to `default_num_tables(N, K)`.
    `.search(query_codes, k)` returns exactly what `hamming_topk` returns (`alive=` restricts
    it to live items); `.pairs_within(radius)` lists all pairs within a radius. Memory: the codes
    (8 ceil(K/64) bytes each) plus `table_bytes` (4 bytes per code per table, plus the offsets).
    """

    def __init__(self, db_codes: Any, num_tables: int | None = None) -> None:
        words, bits = pack_words64(db_codes, "db_codes")
        num_db = words.shape[0]
        if num_db == 0 or num_db >= 2**31:
            raise ValueError(f"MultiIndexHashing needs 1 to 2**31 - 1 codes, got {num_db}")
        if num_tables is None:
            num_tables = default_num_tables(num_db, bits)
        if int(num_tables) != num_tables or not 1 <= num_tables <= bits:
            raise ValueError(f"num_tables must be an integer in [1, {bits}], got {num_tables}")
        num_tables = int(num_tables)
        if -(-bits // num_tables) > _MAX_SUBSTRING_BITS:
            raise ValueError(
                f"{num_tables} tables cut {bits}-bit codes into substrings of "
                f"{-(-bits // num_tables)} bits; at most {_MAX_SUBSTRING_BITS} are supported "
                f"(use at least {-(-bits // _MAX_SUBSTRING_BITS)} tables)"
            )
        self.bits = bits
        self.bounds = substring_bounds(bits, num_tables)
        self.db_columns = np.ascontiguousarray(words.T)  # [W, N]: the linear scan's layout too
        sorted_ids, bucket_starts, keys, dense = [], [], [], []
        for i in range(num_tables):
            values = _substring_values(words, int(self.bounds[i]), int(self.bounds[i + 1]))
            length = int(self.bounds[i + 1] - self.bounds[i])
            is_dense = length <= 16 or 2**length <= 4 * num_db
            if is_dense:
                order, boundaries = _counting_sort(values, 2**length)
            else:
                order = np.argsort(values, kind="stable")  # ids ascending within each bucket
                sorted_values = values[order]
                first = np.flatnonzero(np.diff(sorted_values, prepend=-1))
                keys.append(sorted_values[first])
                boundaries = np.append(first, num_db)
            sorted_ids.append(order.astype(np.uint32))
            bucket_starts.append(boundaries.astype(np.uint32))
            dense.append(is_dense)
        self.sorted_ids = np.stack(sorted_ids)
        self.bucket_starts = np.concatenate(bucket_starts)
        self.bucket_base = np.cumsum([0] + [len(b) for b in bucket_starts]).astype(np.int64)
        self.keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        key_counts = [len(b) - 1 if not d else 0 for b, d in zip(bucket_starts, dense, strict=True)]
        self.key_base = np.concatenate([[0], np.cumsum(key_counts)]).astype(np.int64)
        self.dense = np.array(dense, bool)
        self.sorted_codes = self._gather_sorted_codes()
        self.last_search_stats: dict[str, Any] = {}

    def _gather_sorted_codes(self) -> np.ndarray:
        """`[m, W, N]` uint64: per table the codes in bucket order, so that verifying a bucket
        reads consecutive memory (not one cache miss per entry)."""
        return np.ascontiguousarray(self.db_columns[:, self.sorted_ids].transpose(1, 0, 2))

    @property
    def num_tables(self) -> int:
        """m, the number of substrings and hash tables."""
        return len(self.bounds) - 1

    def __len__(self) -> int:
        return self.db_columns.shape[1]

    @property
    def table_bytes(self) -> int:
        """Bytes of the hash tables: per table the sorted ids and codes, bucket offsets and
        distinct keys (the database codes themselves are `code_bytes`)."""
        tables = (self.sorted_ids, self.sorted_codes, self.bucket_starts, self.keys)
        return sum(a.nbytes for a in tables)

    @property
    def code_bytes(self) -> int:
        """Bytes of the database codes held for verification and the linear-scan fallback."""
        return self.db_columns.nbytes

    def search(
        self, query_codes: Any, k: int, alive: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest database codes, ties by database index, as `hamming_topk`.

        `query_codes: [Q, K]` sign codes (or packed uint8); 1 <= k <= N -> (`distances: [Q, k]`
        int32 ascending, `indices: [Q, k]` int32). `alive`: optional `[N]` bool, the database
        items that count; with it the result is `hamming_topk(query_codes, db_codes[live], k)`
        with indices mapped back through `live = np.flatnonzero(alive)`, and k <= alive.sum().
        Dead items are skipped while probing and never enter the candidates, so the certificate
        holds for the live items. A query whose probing exceeds its work budget
        (`_WORK_PER_ITEM` x live items, in linear-scan items) is answered by the linear scan
        (over the live items); if most of the first `_PILOT_QUERIES` queries are, all remaining
        ones are too. `last_search_stats` records how many queries went each way and the median
        certified radius.
        """
        query_words, query_bits = pack_words64(query_codes, "query_codes")
        if query_bits != self.bits:
            raise InvalidCodesError(
                f"query codes have K={query_bits} bits, database codes K={self.bits}: "
                "they must match"
            )
        alive, alive_bits, num_live = self._check_alive(alive)
        if int(k) != k or not 1 <= k <= num_live:
            what = "database size" if alive is None else "live database items"
            raise ValueError(f"k must be an integer in [1, {num_live}] ({what}), got {k}")
        k = int(k)
        budget = int(min(num_live * _WORK_PER_ITEM, 2**62))
        num_query = len(query_words)
        pilot = min(num_query, _PILOT_QUERIES)
        distances, indices, fell_back, radius, work = self._probe(
            query_words[:pilot], k, alive_bits, budget
        )
        if pilot < num_query and 2 * fell_back.sum() <= pilot:
            rest = self._probe(query_words[pilot:], k, alive_bits, budget)
            distances, indices, fell_back, radius, work = (
                np.concatenate([a, b])
                for a, b in zip((distances, indices, fell_back, radius, work), rest, strict=True)
            )
        answered = ~fell_back
        probed = len(fell_back)
        # Queries over budget, and all after a pilot that mostly was, take the linear scan.
        scanned = np.concatenate([np.flatnonzero(fell_back), np.arange(probed, num_query)])
        distances = np.concatenate([distances, np.zeros((num_query - probed, k), np.int32)])
        indices = np.concatenate([indices, np.zeros((num_query - probed, k), np.int32)])
        if scanned.size:
            distances[scanned], indices[scanned] = self._scan(query_words[scanned], k, alive)
        self.last_search_stats = {
            "queries": num_query,
            "live_items": num_live,
            "answered_by_probing": int(answered.sum()),
            "answered_by_scan": int(scanned.size),
            "median_certified_radius": (
                float(np.median(radius[answered])) if answered.any() else None
            ),
            "mean_probe_work": float(work.mean()) if probed else 0.0,
        }
        return distances, indices

    def _check_alive(self, alive: Any) -> tuple[np.ndarray | None, np.ndarray, int]:
        """Validates a mask of live items -> (the mask `[N]` bool or None, its bits for the
        kernels as `_is_dead` reads them, empty when all are live, the number of live items)."""
        if alive is None:
            return None, np.zeros(0, np.uint8), len(self)
        alive = np.asarray(alive)
        if alive.dtype != np.bool_ or alive.shape != (len(self),):
            raise ValueError(
                f"alive must be a bool array of shape ({len(self)},), one flag per database item "
                f"(True: it counts), got dtype {alive.dtype} and shape {alive.shape}"
            )
        return alive, np.packbits(alive, bitorder="little"), int(np.count_nonzero(alive))

    def _scan(
        self, query_words: np.ndarray, k: int, alive: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The linear scan over all items, or over the live ones (indices mapped back)."""
        if alive is None:
            return scan_topk(query_words, self.db_columns, k, self.bits)
        live = np.flatnonzero(alive)
        distances, positions = scan_topk(query_words, self.db_columns[:, live], k, self.bits)
        return distances, live[positions].astype(np.int32)

    def _kernel_tables(self) -> tuple[np.ndarray, ...]:
        """The index arrays in the order `_mih_query` and `_range_item` take them."""
        return (
            self.sorted_codes,
            _substring_masks(self.bounds, self.db_columns.shape[0]),
            np.diff(self.bounds),
            self.sorted_ids,
            self.dense,
            self.bucket_base,
            self.bucket_starts,
            self.key_base,
            self.keys,
        )

    def _probe(
        self, query_words: np.ndarray, k: int, alive: np.ndarray, budget: int
    ) -> tuple[np.ndarray, ...]:
        """Runs the MIH kernel. `query_words: [Q, W]` uint64, `alive` as `_check_alive` returns
        it, `budget` in linear-scan items -> (distances `[Q, k]`, indices `[Q, k]` int32, fell
        back `[Q]` bool, certified radius `[Q]`, work `[Q]` int64); rows that fell back hold no
        result."""
        num_query = len(query_words)
        substrings = np.stack(
            [
                _substring_values(query_words, int(self.bounds[i]), int(self.bounds[i + 1]))
                for i in range(self.num_tables)
            ],
            axis=1,
        ).reshape(num_query, self.num_tables)
        outputs = (
            np.zeros((num_query, k), np.int32),
            np.zeros((num_query, k), np.int32),
            np.zeros(num_query, bool),
            np.zeros(num_query, np.int64),
            np.zeros(num_query, np.int64),
        )
        if num_query:
            _mih_kernel(
                np.ascontiguousarray(query_words),
                substrings,
                self._kernel_tables(),
                alive,
                k,
                self.bits,
                budget,
                *outputs,
            )
        return outputs

    # ------------------------------------------------------------------------- range search

    def _range_thresholds(self, radius: Any) -> tuple[int, np.ndarray]:
        """Validates radius -> (radius, per-table substring radius `[m]` int64). With radius =
        m rho + a (0 <= a < m), two codes within radius agree within rho bits on one of tables
        0..a or within rho - 1 on one of the others (else they differ in >= (a + 1)(rho + 1)
        + (m - a - 1) rho = radius + 1 bits): table t's threshold is rho for t <= a, else
        rho - 1 (-1: the table is not probed)."""
        integer = isinstance(radius, (int, np.integer)) and not isinstance(radius, bool)
        if not integer or not 0 <= radius <= self.bits:
            raise ValueError(f"radius must be an integer in [0, {self.bits}], got {radius!r}")
        radius = int(radius)
        rho, extra = divmod(radius, self.num_tables)
        thresholds = np.where(np.arange(self.num_tables) <= extra, rho, rho - 1)
        return radius, thresholds.astype(np.int64)

    def range_probe_cost(self, radius: int) -> int:
        """Buckets `pairs_within(radius)` probes per item: sum over tables t of
        sum_{j <= rho_t} C(s_t, j), s_t the substring length and rho_t its threshold (rho =
        radius // m for the first radius % m + 1 tables, rho - 1 for the others); about
        m sum_{j <= rho} C(s, j). Each probe is a random memory access worth ~ `_PROBE_COST`
        linear-scan items, plus a pass over the bucket's entries; a blocked all-pairs scan
        costs ~ N / 2 items per item. So probing pays when `range_probe_pays` says so: large N,
        radius small against m (a few bits per substring); otherwise compute all pairs."""
        _, thresholds = self._range_thresholds(radius)
        lengths = np.diff(self.bounds)
        return sum(
            math.comb(int(s), j)
            for s, rho in zip(lengths, thresholds, strict=True)
            for j in range(min(int(rho), int(s)) + 1)
        )

    def range_probe_pays(self, radius: int) -> bool:
        """Whether `pairs_within(radius)` should beat a blocked all-pairs scan: its probes per
        item (`range_probe_cost`) x `_PROBE_COST` under the N / 2 codes an all-pairs scan
        compares per item. A lower bound on probing's cost (bucket entries not counted): on
        crowded buckets (clustered codes) probing costs more."""
        return self.range_probe_cost(radius) * _PROBE_COST < len(self) / 2

    def pairs_within(
        self, radius: int, alive: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair of database items i < j at Hamming distance <= `radius`, found by probing
        the tables (range search, not all pairs; see `range_probe_cost` for when it pays).

        `radius`: an integer in [0, K]; `alive`: optional `[N]` bool, only pairs of live items.
        -> (first, second, distances) `[P]` int64, sorted by (first, second). For each live
        item i and each table t, the buckets within the table's threshold (`_range_thresholds`:
        pigeonhole) of i's substring are probed and entries j > i, live, within radius are
        kept unless an earlier table is within its threshold of the pair, so each pair is
        emitted once: through the first table whose substrings agree within its threshold.
        Parallel over items: a counting pass, then a writing pass into the prefix sums.
        """
        radius, thresholds = self._range_thresholds(radius)
        _, alive_bits, _ = self._check_alive(alive)
        words = self.db_columns.T
        substrings = np.stack(
            [
                _substring_values(words, int(self.bounds[i]), int(self.bounds[i + 1]))
                for i in range(self.num_tables)
            ]
        ).astype(np.uint32)
        tables = self._kernel_tables()
        counts = np.zeros(len(self) + 1, np.int64)
        none = np.zeros(0, np.int64)
        arguments = (self.db_columns, substrings, tables, thresholds, radius, alive_bits)
        _range_kernel(*arguments, False, counts, none, none)
        starts = np.concatenate([[0], np.cumsum(counts[:-1])]).astype(np.int64)
        seconds = np.empty(starts[-1], np.int64)
        distances = np.empty(starts[-1], np.int64)
        _range_kernel(*arguments, True, starts, seconds, distances)
        first = np.repeat(np.arange(len(self), dtype=np.int64), counts[:-1])
        return first, seconds, distances

    # ------------------------------------------------------------------------------ save / load

    def _fields(self) -> dict[str, np.ndarray]:
        return {
            "format_version": np.array(MIH_FORMAT_VERSION, np.int64),
            "bits": np.array(self.bits, np.int64),
            "bounds": self.bounds,
            "db_columns": self.db_columns,
            "sorted_ids": self.sorted_ids,
            "bucket_starts": self.bucket_starts,
            "bucket_base": self.bucket_base.astype(np.int64),
            "keys": self.keys,
            "key_base": self.key_base,
            "dense": self.dense,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index to `path` (one .npz, no pickle, SHA-256 over every field) atomically:
        a temporary file in the same folder, then `os.replace`."""
        save_checked_npz(path, self._fields())

    @classmethod
    def load(cls, path: str | os.PathLike) -> MultiIndexHashing:
        """Reads an index written by `save`. Raises `IndexFileError` naming the
        file if it cannot be read, is of another format version, fails its checksum or is
        inconsistent."""
        fields = load_checked_npz(
            path, "multi-index", MIH_FORMAT_VERSION, "rebuild the index", IndexFileError
        )
        expected = cls.__new__(cls)
        try:
            expected.bits = int(fields["bits"])
            expected.bounds = fields["bounds"].astype(np.int64)
            expected.db_columns = np.ascontiguousarray(fields["db_columns"], np.uint64)
            expected.sorted_ids = np.ascontiguousarray(fields["sorted_ids"], np.uint32)
            expected.bucket_starts = np.ascontiguousarray(fields["bucket_starts"], np.uint32)
            expected.bucket_base = fields["bucket_base"].astype(np.int64)
            expected.keys = fields["keys"].astype(np.int64)
            expected.key_base = fields["key_base"].astype(np.int64)
            expected.dense = fields["dense"].astype(bool)
            expected.last_search_stats = {}
            expected._check_consistent()
            expected.sorted_codes = expected._gather_sorted_codes()
        except (KeyError, ValueError, IndexError) as error:
            raise IndexFileError(f"{path}: inconsistent multi-index ({error})") from error
        return expected

    def _check_consistent(self) -> None:
        """Shapes that the kernel relies on (it does not bounds-check): ValueError if not."""
        m, num_db = len(self.bounds) - 1, self.db_columns.shape[1]
        ok = (
            m >= 1
            and self.bounds[0] == 0
            and self.bounds[-1] == self.bits
            and self.db_columns.shape[0] == -(-self.bits // 64)
            and self.sorted_ids.shape == (m, num_db)
            and self.dense.shape == (m,)
            and self.bucket_base.shape == (m + 1,)
            and self.key_base.shape == (m + 1,)
            and self.bucket_base[-1] == len(self.bucket_starts)
            and self.key_base[-1] == len(self.keys)
        )
        if ok:
            lengths = np.diff(self.bounds)
            sizes = np.diff(self.bucket_base)
            ok = bool(np.all(lengths >= 1) and np.all(lengths <= _MAX_SUBSTRING_BITS))
            ok = ok and bool(np.all(np.where(self.dense, sizes == 2**lengths + 1, True)))
            ok = ok and bool(
                np.all(np.where(self.dense, True, sizes == np.diff(self.key_base) + 1))
            )
            ok = ok and bool(np.all(self.sorted_ids < num_db))
        if not ok:
            raise ValueError("table shapes do not match the codes")
