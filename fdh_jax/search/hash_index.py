"""A saved, searchable hash index: `HashIndex` and its `.npz` file format.

An index holds the codes of a collection with what produced them (paths, labels, the training
config, the encoder's identity, and for codes fitted to the collection the linear hash its
queries go through). `HashIndex.search` is exact, ties by database order, through the linear
scan or, for large databases, multi-index hashing (`prefer_multi_index`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from fdh_jax.common.checksums import load_checked_npz, save_checked_npz
from fdh_jax.search.bits import IndexFileError, as_sign_codes, pack_codes, unpack_codes
from fdh_jax.search.multi_index import MultiIndexHashing
from fdh_jax.search.scan import hamming_topk

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


INDEX_FORMAT_VERSION = 2  # 2: records the encoder's identity (fingerprint, step, preprocessing)


def _text_field(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8)


@dataclasses.dataclass
class HashIndex:
    """A searchable database of hash codes with what produced them.

    codes: [N, K] int8 in {-1, +1}; labels: [N] int64 class ids (-1 when unknown);
    paths: N image paths; checkpoint: the checkpoint that encoded them; config_json: the
    training config as JSON; encoder_json: the encoder's identity as JSON (parameter
    fingerprint, checkpoint step, code lengths, preprocessing:
    `fdh_jax.serving.encoder.Encoder.identity`), which a search compares with the encoder of its
    queries; code_mean [F] and code_projection [F, K] float64: for codes fitted to this
    collection (`fdh_jax.search.adaptation`, `--mode=encode --adapt`), the linear hash that
    queries go through, else None. Saved as one .npz (no pickle) with packed codes and a SHA-256
    checksum; `load` refuses corrupted files, checksum mismatches and other format versions.
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
