"""Search in Hamming space: codes, exact top-k, multi-index hashing, saved indexes, fitted codes.

Modules, lowest first (each imports only those above it):

- `bits`: code validation, bit packing and the numba popcount primitives;
- `scan`: `hamming_distance` and `hamming_topk`, the exact linear scan;
- `multi_index`: `MultiIndexHashing`, exact and sub-linear;
- `hash_index`: `HashIndex`, a searchable collection of codes saved as one `.npz`;
- `adaptation`: PCA-ITQ codes fitted to a collection without labels (`--adapt`);
- `duplicates`: near-duplicate pairs and groups;
- `segments`: a living collection's files (manifest and append-only segments);
- `collection`: `Collection` and `open_collection`, a collection that changes.

The names below are imported on first use, so that importing one module does not import all.
"""

from fdh_jax.common.lazy import lazy_exports

_EXPORTS = {
    "IndexFileError": "fdh_jax.search.bits",
    "InvalidCodesError": "fdh_jax.search.bits",
    "as_sign_codes": "fdh_jax.search.bits",
    "pack_codes": "fdh_jax.search.bits",
    "pack_query_and_database": "fdh_jax.search.bits",
    "pack_words": "fdh_jax.search.bits",
    "pack_words64": "fdh_jax.search.bits",
    "unpack_codes": "fdh_jax.search.bits",
    "word_hamming_distance": "fdh_jax.search.bits",
    "hamming_distance": "fdh_jax.search.scan",
    "hamming_topk": "fdh_jax.search.scan",
    "MultiIndexHashing": "fdh_jax.search.multi_index",
    "INDEX_FORMAT_VERSION": "fdh_jax.search.hash_index",
    "HashIndex": "fdh_jax.search.hash_index",
    "prefer_multi_index": "fdh_jax.search.hash_index",
    "search_codes": "fdh_jax.search.hash_index",
    "CollectionHash": "fdh_jax.search.adaptation",
    "fit_pca_itq": "fdh_jax.search.adaptation",
    "transfer_features": "fdh_jax.search.adaptation",
    "Collection": "fdh_jax.search.collection",
    "CollectionError": "fdh_jax.search.segments",
    "open_collection": "fdh_jax.search.collection",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
