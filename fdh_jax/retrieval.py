"""The import path of Hamming search before `fdh_jax.search` existed, kept for existing code.

`fdh_jax.retrieval.X` is `fdh_jax.search.X` for every name below; new code imports
`fdh_jax.search` (see docs/design.md, "Module map").
"""

from fdh_jax.search.bits import (
    IndexFileError,
    InvalidCodesError,
    as_sign_codes,
    pack_codes,
    pack_query_and_database,
    pack_words,
    pack_words64,
    unpack_codes,
    word_hamming_distance,
)
from fdh_jax.search.hash_index import (
    INDEX_FORMAT_VERSION,
    HashIndex,
    prefer_multi_index,
    search_codes,
)
from fdh_jax.search.multi_index import MultiIndexHashing
from fdh_jax.search.scan import hamming_distance, hamming_topk

__all__ = [
    "INDEX_FORMAT_VERSION",
    "HashIndex",
    "IndexFileError",
    "InvalidCodesError",
    "MultiIndexHashing",
    "as_sign_codes",
    "hamming_distance",
    "hamming_topk",
    "pack_codes",
    "pack_query_and_database",
    "pack_words",
    "pack_words64",
    "prefer_multi_index",
    "search_codes",
    "unpack_codes",
    "word_hamming_distance",
]
