"""Binary codes as data: validation, bit packing, and the popcount kernels every search uses.

Codes enter in one of two forms, told apart by dtype:

- **sign codes** `[N, K]` of any signed-integer or floating dtype (int8 is canonical) holding only
  -1 and +1, as the hash heads emit them (`where(h >= 0, +1, -1)`);
- **packed codes** `[N, ceil(K/8)]` uint8 from `pack_codes` (bit 1 for +1, most significant bit
  first, zero padding). Packed codes know their byte count, not K; the Hamming distance is the same
  either way because padding bits are 0 on both sides.

Anything else (bool, other unsigned, values outside {-1, +1}, 1-D arrays, K mismatch between query
and database) raises `InvalidCodesError`, a `ValueError`.

The lowest module of `fdh_jax.search`: the linear scan (`scan.py`) and multi-index hashing
(`multi_index.py`) are built from the word layouts (`pack_words`, `pack_words64`) and the numba
primitives (`popcount`, `count_closer`, `word_distance`, `kth_smallest`) defined here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numba import njit, types
from numba.extending import intrinsic

SUB_BLOCK = 64  # items per counted sub-block: candidates are re-read only in sub-blocks with hits


class InvalidCodesError(ValueError):
    """Codes with a wrong dtype, shape or values."""


class IndexFileError(ValueError):
    """A saved index (`HashIndex`, `MultiIndexHashing`) that is unreadable, corrupted, or of
    another format version."""


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


def pack_words64(codes: Any, name: str = "codes") -> tuple[np.ndarray, int]:
    """Sign or packed codes -> (`[N, ceil(K/64)]` uint64 words, K), the layout of the CPU kernels.

    Word w holds packed bytes 8w..8w+7 little-endian; any fixed byte order gives the same Hamming
    distance. For packed uint8 input K is reported as 8 x bytes, as in `pack_words`.
    """
    words, bits = pack_words(codes, name)
    return widen_words(words), bits


def widen_words(words: np.ndarray) -> np.ndarray:
    """`[N, W]` uint32 words from `pack_words` -> `[N, ceil(W/2)]` uint64 (zero-padded)."""
    if words.shape[1] % 2:
        words = np.concatenate([words, np.zeros((words.shape[0], 1), np.uint32)], axis=1)
    return np.ascontiguousarray(words).view("<u8")


@intrinsic
def popcount(typingctx, word):
    """Bits set in a uint64 word, as int64: LLVM's ctpop, a vector popcount inside vectorised
    loops. int64 on purpose: numba compares uint64 with int64 through float64."""

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.int64(types.uint64), codegen


@njit(inline="always")
def kth_smallest(histogram: np.ndarray, k: int) -> int:
    """The smallest t with histogram[0] + ... + histogram[t] >= k (len(histogram) if none)."""
    total = 0
    for t in range(histogram.shape[0]):
        total += histogram[t]
        if total >= k:
            return t
    return histogram.shape[0]


@njit(inline="always")
def count_closer(query, db_columns, start, stop, bound, scratch):
    """How many of db_columns[:, start:stop] lie at distance < bound from query. Slices, not
    offset indices: with an index that may be negative numba wraps it, and LLVM then gathers."""
    num_words = db_columns.shape[0]
    count = 0
    if num_words == 1:
        column, word = db_columns[0, start:stop], query[0]
        for j in range(column.shape[0]):
            count += popcount(word ^ column[j]) < bound
    elif num_words == 2:
        low, high = db_columns[0, start:stop], db_columns[1, start:stop]
        word_low, word_high = query[0], query[1]
        for j in range(low.shape[0]):
            count += popcount(word_low ^ low[j]) + popcount(word_high ^ high[j]) < bound
    else:
        distances = scratch[: stop - start]
        column, word = db_columns[0, start:stop], query[0]
        for j in range(column.shape[0]):
            distances[j] = popcount(word ^ column[j])
        for w in range(1, num_words):
            column, word = db_columns[w, start:stop], query[w]
            for j in range(column.shape[0]):
                distances[j] += popcount(word ^ column[j])
        for j in range(distances.shape[0]):
            count += distances[j] < bound
    return count


@njit(inline="always")
def word_distance(query, db_columns, j):
    """Hamming distance between query `[W]` and database item j of db_columns `[W, N]`."""
    distance = 0
    for w in range(db_columns.shape[0]):
        distance += popcount(query[w] ^ db_columns[w, j])
    return distance
