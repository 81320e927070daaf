"""Hamming-space retrieval: bit packing, Hamming distance, exact top-k search, a saved hash index.

Codes enter in one of two forms, told apart by dtype:

- **sign codes** `[N, K]` of any signed-integer or floating dtype (int8 is canonical) holding only
  -1 and +1, as the hash heads emit them (`where(h >= 0, +1, -1)`);
- **packed codes** `[N, ceil(K/8)]` uint8 from `pack_codes` (bit 1 for +1, most significant bit
  first, zero padding). Packed codes know their byte count, not K; the Hamming distance is the same
  either way because padding bits are 0 on both sides.

Anything else (bool, other unsigned, values outside {-1, +1}, 1-D arrays, K mismatch between query
and database) raises `InvalidCodesError`, a `ValueError`.

Distances run as jitted XLA over packed 32-bit words (`population_count` of XORs), so they use an
accelerator when JAX has one. Exact top-k search runs on an accelerator as XLA, on CPU as a numba
kernel (vector popcounts, no sort); every search is chunked so memory stays bounded for any
database. `MultiIndexHashing` (fdh_jax/multi_index.py) answers the same top-k sub-linearly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numba import njit, prange, types
from numba.extending import intrinsic

from fdh_jax.checksums import load_checked_npz, save_checked_npz


class InvalidCodesError(ValueError):
    """Codes with a wrong dtype, shape or values."""


def as_sign_codes(codes: Any, name: str = "codes") -> np.ndarray:
    """Validates sign codes. `codes: [N, K]` signed int / float in {-1, +1} -> `[N, K]` int8."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise InvalidCodesError(f"{name} must be 2-D [N, K], got shape {codes.shape}")
    if codes.dtype.kind not in "if":
        raise InvalidCodesError(
            f"{name} must be signed-integer or floating codes in {{-1, +1}} (or packed uint8), "
            f"got dtype {codes.dtype}"
        )
    if not np.all((codes == 1) | (codes == -1)):
        bad = codes[(codes != 1) & (codes != -1)]
        raise InvalidCodesError(
            f"{name} must hold only -1 and +1; found {bad.size} other values, e.g. {bad.flat[0]!r} "
            "(binarise with where(h >= 0, 1, -1), not sign(), which maps 0 to 0)"
        )
    return codes.astype(np.int8)


def pack_codes(codes: Any) -> np.ndarray:
    """Packs sign codes into bits. `codes: [N, K]` in {-1, +1} -> `[N, ceil(K/8)]` uint8.

    Bit 1 stands for +1; bit k of a code is bit `7 - k % 8` of byte `k // 8` (MSB first, like
    `np.packbits`), zero-padded at the end.
    """
    return np.packbits(as_sign_codes(codes) > 0, axis=1)


def unpack_codes(packed: Any, bits: int) -> np.ndarray:
    """Inverse of `pack_codes`. `packed: [N, ceil(bits/8)]` uint8 -> `[N, bits]` int8 (+-1)."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise InvalidCodesError(
            f"packed codes must be 2-D uint8, got {packed.dtype} {packed.shape}"
        )
    if packed.shape[1] != -(-bits // 8):
        raise InvalidCodesError(
            f"packed codes have {packed.shape[1]} bytes per code, {bits} bits need {-(-bits // 8)}"
        )
    unpacked = np.unpackbits(packed, axis=1, count=bits)
    return np.where(unpacked == 1, 1, -1).astype(np.int8)


def pack_words(codes: Any, name: str = "codes") -> tuple[np.ndarray, int]:
    """Sign or packed codes -> (`[N, ceil(K/32)]` uint32 words, K).

    For packed uint8 input K is reported as 8 x bytes (the true K is not recorded in the bytes).
    """
    codes = np.asarray(codes)
    if codes.dtype == np.uint8:
        if codes.ndim != 2:
            raise InvalidCodesError(f"packed {name} must be 2-D [N, bytes], got {codes.shape}")
        packed, bits = codes, 8 * codes.shape[1]
    else:
        packed, bits = pack_codes(as_sign_codes(codes, name)), codes.shape[1]
    num_words = max(1, -(-packed.shape[1] // 4))
    padded = np.zeros((packed.shape[0], 4 * num_words), np.uint8)
    padded[:, : packed.shape[1]] = packed
    return padded.view("<u4"), bits


def pack_query_and_database(query_codes: Any, db_codes: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Validates a query/database pair. -> (query words, database words, K); K must agree."""
    query_words, query_bits = pack_words(query_codes, "query_codes")
    db_words, db_bits = pack_words(db_codes, "db_codes")
    if query_bits != db_bits:
        raise InvalidCodesError(
            f"query codes have K={query_bits} bits, database codes K={db_bits}: they must match"
        )
    return query_words, db_words, query_bits


@jax.jit
def word_hamming_distance(query_words: jax.Array, db_words: jax.Array) -> jax.Array:
    """`query_words: [Q, W]`, `db_words: [N, W]` uint32 -> Hamming distances `[Q, N]` int32."""
    differing = lax.population_count(query_words[:, None, :] ^ db_words[None, :, :])
    return differing.astype(jnp.int32).sum(-1)


def _query_chunk(num_db: int, max_elements: int = 1 << 23, max_rows: int = 256) -> int:
    """A power-of-two query chunk so that chunk x num_db stays under max_elements."""
    rows = max(1, min(max_rows, max_elements // max(num_db, 1)))
    return 1 << (rows.bit_length() - 1)


def hamming_distance(query_codes: Any, db_codes: Any) -> np.ndarray:
    """Pairwise Hamming distances. `query_codes: [Q, K]`, `db_codes: [N, K]` -> `[Q, N]` int32.

    Accepts sign codes or packed uint8 codes (see the module docstring).
    """
    query_words, db_words, _ = pack_query_and_database(query_codes, db_codes)
    out = np.empty((query_words.shape[0], db_words.shape[0]), np.int32)
    chunk = _query_chunk(db_words.shape[0])
    db_device = jnp.asarray(db_words)
    for start in range(0, query_words.shape[0], chunk):
        rows = query_words[start : start + chunk]
        out[start : start + len(rows)] = np.asarray(word_hamming_distance(rows, db_device))
    return out


# ----------------------------------------------------------------------------- exact top-k search

# CPU linear scan (`_scan_topk`): a numba kernel over 64-bit words. The XLA CPU backend neither
# vectorises population_count nor compacts a mask cheaply (a count-only XLA pass over 1,000 x
# 1,000,000 codes took 2.5 s, faiss's whole search 0.32 s), so the CPU path is compiled by LLVM
# through numba, which turns the inner loop into vector popcounts.
_SCAN_BLOCK = 2048  # database items per tile: 16 KiB of 64-bit codes, reused from L1 by a group
_SCAN_SUB = 64  # items per counted sub-block: candidates are re-read only in sub-blocks with hits
_SCAN_GROUP = 16  # queries per tile and per parallel task
_SCAN_GROUP_BYTES = 1 << 24  # bound on a group's candidate buffers (matters only for huge k)
# Accelerator path (`_device_topk`): per block `lax.top_k` merged by `lax.sort`.
_TOPK_BLOCK = 1 << 20  # database items per kernel call
_TOPK_MAX_MASK = 1 << 26  # query rows x block items per kernel call
_DEVICE_TOPK = False  # tests set True to run the accelerator path on CPU


def pack_words64(codes: Any, name: str = "codes") -> tuple[np.ndarray, int]:
    """Sign or packed codes -> (`[N, ceil(K/64)]` uint64 words, K), the layout of the CPU kernels.

    Word w holds packed bytes 8w..8w+7 little-endian; any fixed byte order gives the same Hamming
    distance. For packed uint8 input K is reported as 8 x bytes, as in `pack_words`.
    """
    words, bits = pack_words(codes, name)
    return _widen_words(words), bits


def _widen_words(words: np.ndarray) -> np.ndarray:
    """`[N, W]` uint32 words from `pack_words` -> `[N, ceil(W/2)]` uint64 (zero-padded)."""
    if words.shape[1] % 2:
        words = np.concatenate([words, np.zeros((words.shape[0], 1), np.uint32)], axis=1)
    return np.ascontiguousarray(words).view("<u8")


@intrinsic
def _popcount(typingctx, word):
    """Bits set in a uint64 word, as int64: LLVM's ctpop, a vector popcount inside vectorised
    loops. int64 on purpose: numba compares uint64 with int64 through float64."""

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.int64(types.uint64), codegen


@njit(inline="always")
def _kth_smallest(histogram: np.ndarray, k: int) -> int:
    """The smallest t with histogram[0] + ... + histogram[t] >= k (len(histogram) if none)."""
    total = 0
    for t in range(histogram.shape[0]):
        total += histogram[t]
        if total >= k:
            return t
    return histogram.shape[0]


@njit(inline="always")
def _count_closer(query, db_columns, start, stop, bound, scratch):
    """How many of db_columns[:, start:stop] lie at distance < bound from query. Slices, not
    offset indices: with an index that may be negative numba wraps it, and LLVM then gathers."""
    num_words = db_columns.shape[0]
    count = 0
    if num_words == 1:
        column, word = db_columns[0, start:stop], query[0]
        for j in range(column.shape[0]):
            count += _popcount(word ^ column[j]) < bound
    elif num_words == 2:
        low, high = db_columns[0, start:stop], db_columns[1, start:stop]
        word_low, word_high = query[0], query[1]
        for j in range(low.shape[0]):
            count += _popcount(word_low ^ low[j]) + _popcount(word_high ^ high[j]) < bound
    else:
        distances = scratch[: stop - start]
        column, word = db_columns[0, start:stop], query[0]
        for j in range(column.shape[0]):
            distances[j] = _popcount(word ^ column[j])
        for w in range(1, num_words):
            column, word = db_columns[w, start:stop], query[w]
            for j in range(column.shape[0]):
                distances[j] += _popcount(word ^ column[j])
        for j in range(distances.shape[0]):
            count += distances[j] < bound
    return count


@njit(inline="always")
def _word_distance(query, db_columns, j):
    """Hamming distance between query `[W]` and database item j of db_columns `[W, N]`."""
    distance = 0
    for w in range(db_columns.shape[0]):
        distance += _popcount(query[w] ^ db_columns[w, j])
    return distance


@njit(inline="always")
def _keep_first_k(histogram, kept_distances, kept_indices, count, k):
    """Shrinks a query's count > k candidates, held in database order, to its k best by
    (distance, index): all below the k-th distance t, then the first ones at t. Returns k."""
    t = _kth_smallest(histogram, k)
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
    across its loops; the self-contained steps are helpers (`_count_closer`, `_keep_first_k`).
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
        sub_counts = np.zeros((block + _SCAN_SUB - 1) // _SCAN_SUB, np.int64)
        scratch = np.empty(_SCAN_SUB, np.int64)
        for start in range(0, num_db, block):
            stop = min(num_db, start + block)
            for r in range(rows):
                query, t = query_words[first + r], bound[r]
                hits = 0
                for s in range(start, stop, _SCAN_SUB):
                    end = min(stop, s + _SCAN_SUB)
                    found = _count_closer(query, db_columns, s, end, t, scratch)
                    sub_counts[(s - start) // _SCAN_SUB] = found
                    hits += found
                if hits == 0:
                    continue
                count = kept[r]
                if count + hits > capacity:
                    count = _keep_first_k(
                        histogram[r], kept_distances[r], kept_indices[r], count, k
                    )
                for s in range(start, stop, _SCAN_SUB):
                    if sub_counts[(s - start) // _SCAN_SUB] == 0:
                        continue
                    for j in range(s, min(stop, s + _SCAN_SUB)):
                        d = _word_distance(query, db_columns, j)
                        if d < t:
                            kept_distances[r, count] = d
                            kept_indices[r, count] = j
                            histogram[r, d] += 1
                            count += 1
                kept[r] = count
                if count >= k:
                    bound[r] = _kth_smallest(histogram[r], k)
        for r in range(rows):
            # A stable counting sort by distance of the candidates (in database order) that make
            # the top k: ascending distance, ties by index.
            t = _kth_smallest(histogram[r], k)
            position = np.zeros(t + 1, np.int64)
            for d in range(1, t + 1):
                position[d] = position[d - 1] + histogram[r, d - 1]
            for p in range(kept[r]):
                d = kept_distances[r, p]
                if d <= t and position[d] < k:
                    out_distances[first + r, position[d]] = d
                    out_indices[first + r, position[d]] = kept_indices[r, p]
                    position[d] += 1


def _scan_topk(
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
        return _scan_topk(_widen_words(query_words), _widen_words(db_words).T, k, bits)
    return _device_topk(query_words, db_words, k)


# Databases from this size on are worth a MultiIndexHashing: below it a linear scan of all queries
# costs about as much as building the tables, and probing wins little per query. An estimate, to
# be confirmed by the break-even of `python benchmarks/search.py --mode=sweep` on a quiet machine.
_MIH_MIN_DB = 1 << 18


def prefer_multi_index(num_db: int, bits: int) -> bool:
    """The rule for building a `MultiIndexHashing` over `num_db` codes of `bits` bits.

    True from `_MIH_MIN_DB` codes on, for codes of up to 128 bits: the tables take m x N x
    (4 + 8 ceil(K/64)) bytes with m ~ K / log2 N tables, which grows as K^2 (128 bits, 10M codes:
    1.4 GB). Whether probing beats the scan also depends on the codes (how close the k-th
    neighbour is); that is decided per query at search time, where a query whose probing would
    cost more than a scan is scanned (`MultiIndexHashing.search`).
    """
    return num_db >= _MIH_MIN_DB and bits <= 128


def search_codes(
    query_codes: Any, db_codes: Any, k: int, *, index: MultiIndexHashing | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k as `hamming_topk`, through `index` when given.

    `query_codes: [Q, K]`, `db_codes: [N, K]` (sign or packed); `index`: a `MultiIndexHashing`
    built on `db_codes` (e.g. when `prefer_multi_index(N, K)`) -> (`distances: [Q, k]`,
    `indices: [Q, k]` int32), identical either way.
    """
    if index is None:
        return hamming_topk(query_codes, db_codes, k)
    if len(index) != np.shape(db_codes)[0]:
        raise ValueError(
            f"the multi-index holds {len(index)} codes, the database {np.shape(db_codes)[0]}"
        )
    return index.search(query_codes, k)


# Sub-linear exact search. fdh_jax.multi_index imports the kernels above, so this import comes
# after them (importing fdh_jax.multi_index first also works: the package imports this module).
from fdh_jax.multi_index import MultiIndexHashing  # noqa: E402, F401 (re-export)

# ----------------------------------------------------------------------------- saved hash index

INDEX_FORMAT_VERSION = 2  # 2: records the encoder's identity (fingerprint, step, preprocessing)


class IndexFileError(ValueError):
    """A hash index file that is unreadable, corrupted, or of another format version."""


def _text_field(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8)


@dataclasses.dataclass
class HashIndex:
    """A searchable database of hash codes with what produced them.

    codes: [N, K] int8 in {-1, +1}; labels: [N] int64 class ids (-1 when unknown);
    paths: N image paths; checkpoint: the checkpoint that encoded them; config_json: the
    training config as JSON; encoder_json: the encoder's identity as JSON (parameter
    fingerprint, checkpoint step, code lengths, preprocessing: `fdh_jax.inference.Encoder.
    identity`), which a search compares with the encoder of its queries; code_mean [F] and
    code_projection [F, K] float64: for codes fitted to this collection (`fdh_jax.adaptation`,
    `--mode=encode --adapt`), the linear hash that queries go through, else None. Saved as one
    .npz (no pickle) with packed codes and a SHA-256 checksum; `load` refuses corrupted files,
    checksum mismatches and other format versions.
    """

    codes: np.ndarray
    labels: np.ndarray
    paths: list[str]
    checkpoint: str = ""
    config_json: str = "{}"
    encoder_json: str = "{}"
    code_mean: np.ndarray | None = None
    code_projection: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.codes = as_sign_codes(self.codes, "HashIndex codes")
        self.labels = np.asarray(self.labels).astype(np.int64)
        self.paths = [str(p) for p in self.paths]
        n = self.codes.shape[0]
        if self.labels.shape != (n,) or len(self.paths) != n:
            raise ValueError(
                f"HashIndex needs one label and one path per code: {n} codes, "
                f"labels {self.labels.shape}, {len(self.paths)} paths"
            )
        json.loads(self.config_json)  # must be valid JSON
        json.loads(self.encoder_json)
        if (self.code_mean is None) != (self.code_projection is None):
            raise ValueError("HashIndex needs both code_mean and code_projection, or neither")
        if self.code_projection is not None:
            self.code_mean = np.asarray(self.code_mean, np.float64)
            self.code_projection = np.asarray(self.code_projection, np.float64)
            if self.code_projection.shape != (self.code_mean.shape[0], self.bits):
                raise ValueError(
                    f"HashIndex code_projection {self.code_projection.shape} does not map "
                    f"{self.code_mean.shape[0]} features to {self.bits} bits"
                )

    @property
    def bits(self) -> int:
        """K, the code length."""
        return self.codes.shape[1]

    def __len__(self) -> int:
        return self.codes.shape[0]

    def search(
        self, query_codes: Any, k: int, method: str = "auto"
    ) -> tuple[list[list[str]], np.ndarray]:
        """`query_codes: [Q, K]` -> (paths `Q x k'`, distances `[Q, k']` int32), nearest first,
        ties by database order; k' = min(k, N).

        `method`: "scan" (`hamming_topk`), "multi_index" (`MultiIndexHashing`, built on first
        use and kept with the index object), or "auto": the multi-index where
        `prefer_multi_index(N, K)` says it pays (large databases), else the scan. The results
        are identical whichever runs.
        """
        if method not in ("auto", "scan", "multi_index"):
            raise ValueError(f"method must be auto, scan or multi_index, got {method!r}")
        use_index = method == "multi_index" or (
            method == "auto" and prefer_multi_index(len(self), self.bits)
        )
        index = self.multi_index() if use_index else None
        distances, indices = search_codes(query_codes, self.codes, min(k, len(self)), index=index)
        return [[self.paths[i] for i in row] for row in indices], distances

    def multi_index(self) -> MultiIndexHashing:
        """The `MultiIndexHashing` of these codes (built once per object)."""
        if getattr(self, "_multi_index", None) is None:
            self._multi_index = MultiIndexHashing(self.codes)
        return self._multi_index

    def _fields(self) -> dict[str, np.ndarray]:
        return {
            "format_version": np.array(INDEX_FORMAT_VERSION, np.int64),
            "bits": np.array(self.bits, np.int64),
            "packed_codes": pack_codes(self.codes),
            "labels": self.labels,
            "paths_json": _text_field(json.dumps(self.paths)),
            "checkpoint": _text_field(self.checkpoint),
            "config_json": _text_field(self.config_json),
            "encoder_json": _text_field(self.encoder_json),
        } | (
            {}
            if self.code_projection is None
            else {"code_mean": self.code_mean, "code_projection": self.code_projection}
        )

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index to `path` (.npz, with its SHA-256) atomically (temporary file +
        rename)."""
        save_checked_npz(path, self._fields())

    @classmethod
    def load(cls, path: str | os.PathLike) -> HashIndex:
        """Reads an index written by `save`; raises `IndexFileError` naming the file if it cannot
        be read, was written by another format version, or fails its checksum."""
        fields = load_checked_npz(
            path, "hash index", INDEX_FORMAT_VERSION, "re-encode the database", IndexFileError
        )
        try:
            bits = int(fields["bits"])
            return cls(
                codes=unpack_codes(fields["packed_codes"], bits),
                labels=fields["labels"],
                paths=json.loads(bytes(fields["paths_json"]).decode("utf-8")),
                checkpoint=bytes(fields["checkpoint"]).decode("utf-8"),
                config_json=bytes(fields["config_json"]).decode("utf-8"),
                encoder_json=bytes(fields["encoder_json"]).decode("utf-8"),
                code_mean=fields.get("code_mean"),
                code_projection=fields.get("code_projection"),
            )
        except (KeyError, ValueError) as error:
            raise IndexFileError(f"{path}: inconsistent hash index ({error})") from error
