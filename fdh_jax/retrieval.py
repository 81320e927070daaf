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

import dataclasses
import hashlib
import json
import os
import zipfile
from functools import partial
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


# ----------------------------------------------------------------------------- exact top-k search

_TOPK_FIRST_BLOCK = 1 << 15  # database items ranked exactly to seed the threshold
_TOPK_BLOCK = 1 << 20  # database items per later kernel call
_TOPK_MAX_MASK = 1 << 26  # query rows x block items per kernel call (bytes of the bool mask)
_DEVICE_TOPK = False  # tests set True to run the accelerator path on CPU


@jax.jit
def _closer_than(query_words: jax.Array, db_words: jax.Array, radius: jax.Array) -> jax.Array:
    """`[C, W]`, `[B, W]` uint32, `radius: [C]` int32 -> `[C, B]` bool, distance < radius."""
    return word_hamming_distance(query_words, db_words) < radius[:, None]


def _select_topk(
    rows: np.ndarray, distances: np.ndarray, indices: np.ndarray, num_rows: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k candidates smallest by (distance, index). Every row has >= k candidates.

    `rows, distances, indices: [M]` -> (`[num_rows, k]` distances, `[num_rows, k]` indices).
    """
    order = np.lexsort((indices, distances, rows))
    starts = np.searchsorted(rows[order], np.arange(num_rows))
    take = order[starts[:, None] + np.arange(k)]
    return distances[take].astype(np.int32), indices[take].astype(np.int32)


def _host_topk(
    query_words: np.ndarray, db_words: np.ndarray, k: int, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """CPU top-k without sorting the database: rank a first block exactly (distance histogram
    gives each query's k-th distance), then stream the rest keeping only items strictly closer
    than the current k-th best (later items lose ties: their index is larger)."""
    num_query, num_db = query_words.shape[0], db_words.shape[0]
    first = min(num_db, max(_TOPK_FIRST_BLOCK, k))
    starts = list(range(first, num_db, _TOPK_BLOCK))
    db_device = [jnp.asarray(db_words[:first])]
    db_device += [jnp.asarray(db_words[s : s + _TOPK_BLOCK]) for s in starts]
    max_rows = max(1, min(64, _TOPK_MAX_MASK // min(num_db, _TOPK_BLOCK)))
    chunk = 1 << (max_rows.bit_length() - 1)
    out_distances = np.empty((num_query, k), np.int32)
    out_indices = np.empty((num_query, k), np.int32)
    for q0 in range(0, num_query, chunk):
        rows = min(chunk, num_query - q0)
        chunk_words = np.zeros((chunk, query_words.shape[1]), np.uint32)
        chunk_words[:rows] = query_words[q0 : q0 + rows]
        first_distances = np.asarray(word_hamming_distance(chunk_words, db_device[0]))[:rows]
        offsets = np.arange(rows)[:, None] * (bits + 1)
        histogram = np.bincount((offsets + first_distances).ravel(), minlength=rows * (bits + 1))
        reached = np.cumsum(histogram.reshape(rows, bits + 1), axis=1) >= k
        kth = np.argmax(reached, axis=1)  # k-th smallest distance in the first block
        flat = np.flatnonzero(first_distances <= kth[:, None])
        best_distances, best_indices = _select_topk(
            flat // first, first_distances.ravel()[flat], flat % first, rows, k
        )

        def launch(block: int, kth_best: np.ndarray, words: np.ndarray = chunk_words) -> jax.Array:
            # The radius may be one block stale: a larger radius only adds candidates.
            radius = np.zeros(len(words), np.int32)
            radius[: len(kth_best)] = kth_best
            return _closer_than(words, db_device[block + 1], radius)

        pending = launch(0, best_distances[:, -1]) if starts else None
        for b, start in enumerate(starts):
            mask_on_device = pending
            pending = launch(b + 1, best_distances[:, -1]) if b + 1 < len(starts) else None
            mask = np.asarray(mask_on_device)
            flat = np.flatnonzero(mask)
            if flat.size == 0:
                continue
            block_size = mask.shape[1]
            rows_new, index_new = flat // block_size, flat % block_size + start
            differing = np.bitwise_count(chunk_words[rows_new] ^ db_words[index_new])
            best_distances, best_indices = _select_topk(
                np.concatenate([np.repeat(np.arange(rows), k), rows_new]),
                np.concatenate([best_distances.ravel(), differing.sum(1)]),
                np.concatenate([best_indices.ravel(), index_new]),
                rows,
                k,
            )
        out_distances[q0 : q0 + rows] = best_distances
        out_indices[q0 : q0 + rows] = best_indices
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
        return _host_topk(query_words, db_words, k, bits)
    return _device_topk(query_words, db_words, k)


# ----------------------------------------------------------------------------- saved hash index

INDEX_FORMAT_VERSION = 2  # 2: records the encoder's identity (fingerprint, step, preprocessing)


class IndexFileError(ValueError):
    """A hash index file that is unreadable, corrupted, or of another format version."""


def _index_checksum(fields: dict[str, np.ndarray]) -> str:
    """SHA-256 over every field's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(fields):
        array = np.ascontiguousarray(fields[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _text_field(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8)


@dataclasses.dataclass
class HashIndex:
    """A searchable database of hash codes with what produced them.

    codes: [N, K] int8 in {-1, +1}; labels: [N] int64 class ids (-1 when unknown);
    paths: N image paths; checkpoint: the checkpoint that encoded them; config_json: the
    training config as JSON; encoder_json: the encoder's identity as JSON (parameter
    fingerprint, checkpoint step, code lengths, preprocessing: `fdh_jax.inference.Encoder.
    identity`), which a search compares with the encoder of its queries. Saved as one .npz (no
    pickle) with packed codes and a SHA-256 checksum; `load` refuses corrupted files, checksum
    mismatches and other format versions.
    """

    codes: np.ndarray
    labels: np.ndarray
    paths: list[str]
    checkpoint: str = ""
    config_json: str = "{}"
    encoder_json: str = "{}"

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

    @property
    def bits(self) -> int:
        """K, the code length."""
        return self.codes.shape[1]

    def __len__(self) -> int:
        return self.codes.shape[0]

    def search(self, query_codes: Any, k: int) -> tuple[list[list[str]], np.ndarray]:
        """`query_codes: [Q, K]` -> (paths `Q x k'`, distances `[Q, k']` int32), nearest first,
        ties by database order; k' = min(k, N)."""
        distances, indices = hamming_topk(query_codes, self.codes, min(k, len(self)))
        return [[self.paths[i] for i in row] for row in indices], distances

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
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index to `path` (.npz) atomically (temporary file + rename)."""
        fields = self._fields()
        fields["sha256"] = _text_field(_index_checksum(fields))
        path = os.fspath(path)
        temporary = f"{path}.tmp-{os.getpid()}"
        with open(temporary, "wb") as f:
            np.savez(f, **fields)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HashIndex:
        """Reads an index written by `save`; raises `IndexFileError` naming the file if it cannot
        be read, was written by another format version, or fails its checksum."""
        path = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as archive:
                fields = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
            raise IndexFileError(f"{path}: not a readable hash index file ({error})") from error
        if "format_version" not in fields:
            raise IndexFileError(f"{path}: not a hash index file (no format_version)")
        version = int(fields["format_version"])
        if version != INDEX_FORMAT_VERSION:
            raise IndexFileError(
                f"{path}: hash index format version {version}, this code reads "
                f"version {INDEX_FORMAT_VERSION}; re-encode the database"
            )
        stored = bytes(fields.pop("sha256", np.zeros(0, np.uint8))).decode("ascii", "replace")
        if stored != _index_checksum(fields):
            raise IndexFileError(f"{path}: checksum mismatch, the file is corrupted")
        try:
            bits = int(fields["bits"])
            return cls(
                codes=unpack_codes(fields["packed_codes"], bits),
                labels=fields["labels"],
                paths=json.loads(bytes(fields["paths_json"]).decode("utf-8")),
                checkpoint=bytes(fields["checkpoint"]).decode("utf-8"),
                config_json=bytes(fields["config_json"]).decode("utf-8"),
                encoder_json=bytes(fields["encoder_json"]).decode("utf-8"),
            )
        except (KeyError, ValueError) as error:
            raise IndexFileError(f"{path}: inconsistent hash index ({error})") from error
