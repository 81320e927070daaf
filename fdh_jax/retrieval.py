"""Hamming-space retrieval: bit packing, Hamming distance, exact top-k search, a saved hash index.

Codes enter in one of two forms, told apart by dtype:

- **sign codes** `[N, K]` of any signed-integer or floating dtype (int8 is canonical) holding only
  -1 and +1, as the hash heads emit them (`where(h >= 0, +1, -1)`);
- **packed codes** `[N, ceil(K/8)]` uint8 from `pack_codes` (bit 1 for +1, most significant bit
  first, zero padding). Packed codes know their byte count, not K; the Hamming distance is the same
  either way because padding bits are 0 on both sides.

Anything else (bool, other unsigned, values outside {-1, +1}, 1-D arrays, K mismatch between query
and database) raises `InvalidCodesError`, a `ValueError`.

The heavy part runs as jitted XLA over packed 32-bit words (`population_count` of XORs), so it uses
an accelerator when JAX has one; every search is chunked so memory stays bounded for any database.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


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
