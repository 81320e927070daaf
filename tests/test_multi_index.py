"""Multi-index hashing against an independent brute force: exact top-k, ties by database index."""

import numpy as np
import pytest

from fdh_jax.common.checksums import arrays_sha256
from fdh_jax.search import hash_index, multi_index
from fdh_jax.search.bits import IndexFileError, InvalidCodesError, pack_codes
from fdh_jax.search.hash_index import HashIndex, prefer_multi_index
from fdh_jax.search.multi_index import MultiIndexHashing
from fdh_jax.search.scan import hamming_topk


def brute_topk(query_codes, db_codes, k):
    """Full distance matrix, then per row the k smallest by (distance, database index)."""
    q, db = query_codes.astype(np.int64), db_codes.astype(np.int64)
    distances = (q.shape[1] - q @ db.T) // 2
    index = np.broadcast_to(np.arange(db.shape[0]), distances.shape)
    order = np.lexsort((index, distances), axis=1)[:, :k]
    return np.take_along_axis(distances, order, 1), order


def random_codes(rng, n, bits):
    return np.where(rng.random((n, bits)) < 0.5, -1, 1).astype(np.int8)


def clustered_codes(rng, n, bits, classes, flip):
    centres = random_codes(rng, classes, bits)
    flips = np.where(rng.random((n, bits)) < flip, -1, 1)
    return (centres[rng.integers(classes, size=n)] * flips).astype(np.int8)


@pytest.fixture
def always_probe(monkeypatch):
    """No work budget: every query is answered by probing, none by the linear scan."""
    monkeypatch.setattr(multi_index, "_WORK_PER_ITEM", 1e12)


def check(query, db, k, num_tables=None, probed=True):
    index = MultiIndexHashing(db, num_tables=num_tables)
    distances, indices = index.search(query, k)
    expected_distances, expected_indices = brute_topk(query, db, k)
    assert distances.dtype == np.int32 and indices.dtype == np.int32
    assert distances.shape == indices.shape == (len(query), k)
    np.testing.assert_array_equal(distances, expected_distances)
    np.testing.assert_array_equal(indices, expected_indices)
    if probed:  # the results came from the tables, not from the fallback scan
        assert index.last_search_stats["answered_by_probing"] == len(query)
    return index


@pytest.mark.parametrize(
    "bits, num_tables", [(12, None), (24, 2), (32, 3), (48, 5), (64, None), (64, 4), (128, 9)]
)
def test_random_codes_equal_brute_force(always_probe, bits, num_tables):
    rng = np.random.default_rng(bits)
    db = random_codes(rng, 1200, bits)
    query = np.concatenate([db[[0, 17]], random_codes(rng, 10, bits)])  # exact hits too
    check(query, db, 25, num_tables)


@pytest.mark.parametrize("bits, num_tables", [(7, 2), (33, 4), (65, 6), (130, 9)])
def test_substrings_of_unequal_length(always_probe, bits, num_tables):
    # K not divisible by m: substrings of ceil(K/m) and floor(K/m) bits, some across 64-bit words.
    rng = np.random.default_rng(bits)
    db = clustered_codes(rng, 900, bits, classes=6, flip=0.1)
    query = clustered_codes(rng, 9, bits, classes=6, flip=0.1)
    index = check(query, db, 40, num_tables)
    assert len(set(np.diff(index.bounds))) == 2


@pytest.mark.parametrize("bits", [32, 64, 128])
def test_clustered_codes_equal_brute_force(always_probe, bits):
    rng = np.random.default_rng(bits + 1)
    centres = random_codes(rng, 20, bits)
    labels = rng.integers(20, size=3000)
    db = (centres[labels] * np.where(rng.random((3000, bits)) < 0.12, -1, 1)).astype(np.int8)
    query = (centres[:8] * np.where(rng.random((8, bits)) < 0.12, -1, 1)).astype(np.int8)
    check(query, db, 100)


def test_many_ties_and_k_larger_than_buckets(always_probe):
    # 12-bit codes, 10 distinct values repeated: every distance is tied hundreds of times, the
    # candidate buffer must grow, and k crosses several whole buckets.
    rng = np.random.default_rng(0)
    distinct = random_codes(rng, 10, 12)
    db = distinct[rng.integers(10, size=2000)]
    query = np.concatenate([distinct[:3], random_codes(rng, 5, 12)])
    for k in (1, 150, 777, 1999, 2000):
        check(query, db, k, num_tables=2)


def test_k_equal_to_and_larger_than_the_database(always_probe):
    rng = np.random.default_rng(1)
    db, query = random_codes(rng, 60, 24), random_codes(rng, 4, 24)
    check(query, db, 60)
    index = MultiIndexHashing(db)
    for bad_k in (61, 0, 2.5):
        with pytest.raises(ValueError, match="k must be") as ours:
            index.search(query, bad_k)
        with pytest.raises(ValueError, match="k must be") as linear:
            hamming_topk(query, db, bad_k)
        assert str(ours.value) == str(linear.value)


def test_fallback_to_the_linear_scan_is_exact(monkeypatch):
    rng = np.random.default_rng(2)
    db = random_codes(rng, 1500, 64)
    query = random_codes(rng, 50, 64)
    monkeypatch.setattr(multi_index, "_WORK_PER_ITEM", 0.0)  # every query over budget
    index = check(query, db, 30, probed=False)
    assert index.last_search_stats["answered_by_scan"] == 50
    # With the shipped budget, uniform random bits (no near neighbours) go to the scan after the
    # pilot queries, which is what makes MIH safe on them.
    monkeypatch.undo()
    index = check(query, db, 30, probed=False)
    stats = index.last_search_stats
    assert stats["answered_by_scan"] >= 50 - multi_index._PILOT_QUERIES
    assert stats["answered_by_probing"] + stats["answered_by_scan"] == 50


def test_packed_input_and_code_length_checks(always_probe):
    rng = np.random.default_rng(4)
    db, query = random_codes(rng, 300, 40), random_codes(rng, 5, 40)
    index = MultiIndexHashing(pack_codes(db))
    distances, indices = index.search(pack_codes(query), 12)
    expected = brute_topk(query, db, 12)
    np.testing.assert_array_equal(distances, expected[0])
    np.testing.assert_array_equal(indices, expected[1])
    with pytest.raises(InvalidCodesError, match="K=32.*K=40"):
        MultiIndexHashing(db).search(query[:, :32], 3)
    with pytest.raises(ValueError, match="num_tables"):
        MultiIndexHashing(db, num_tables=41)
    with pytest.raises(ValueError, match="at most 32"):
        MultiIndexHashing(db, num_tables=1)
    assert multi_index.default_num_tables(10_000_000, 64) == 4
    assert multi_index.default_num_tables(100, 128) == 19


def test_save_load_round_trip_and_checksum(always_probe, tmp_path):
    rng = np.random.default_rng(5)
    db = clustered_codes(rng, 700, 40, classes=5, flip=0.1)
    query = clustered_codes(rng, 6, 40, classes=5, flip=0.1)
    index = MultiIndexHashing(db, num_tables=2)  # 2^20 buckets for 700 codes: the sparse layout
    assert not index.dense.any()
    path = tmp_path / "mih.npz"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["mih.npz"]  # no temporary left behind
    loaded = MultiIndexHashing.load(path)
    for name in ("bounds", "db_columns", "sorted_ids", "sorted_codes", "bucket_starts", "keys"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name))
    for a, b in zip(loaded.search(query, 20), brute_topk(query, db, 20), strict=True):
        np.testing.assert_array_equal(a, b)

    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside a stored array
    (tmp_path / "flipped.npz").write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match="flipped.npz"):
        MultiIndexHashing.load(tmp_path / "flipped.npz")
    with np.load(path) as archive:
        fields = {name: archive[name] for name in archive.files}
    tampered = dict(fields, sorted_ids=fields["sorted_ids"][:, ::-1].copy())
    np.savez(tmp_path / "tampered.npz", **tampered)
    with pytest.raises(IndexFileError, match="tampered.npz: checksum mismatch"):
        MultiIndexHashing.load(tmp_path / "tampered.npz")
    np.savez(tmp_path / "future.npz", **dict(fields, format_version=np.array(2)))
    with pytest.raises(IndexFileError, match="format version 2"):
        MultiIndexHashing.load(tmp_path / "future.npz")
    (tmp_path / "notes.npz").write_text("hello")
    with pytest.raises(IndexFileError, match="notes.npz"):
        MultiIndexHashing.load(tmp_path / "notes.npz")
    # A consistent checksum over inconsistent tables (e.g. written by a buggy tool) is refused
    # too: the kernel does not bounds-check.
    broken = {k: v for k, v in fields.items() if k != "sha256"}
    broken["sorted_ids"] = broken["sorted_ids"][:, :-1].copy()
    broken["sha256"] = np.frombuffer(arrays_sha256(broken).encode(), np.uint8)
    np.savez(tmp_path / "broken.npz", **broken)
    with pytest.raises(IndexFileError, match="broken.npz: inconsistent"):
        MultiIndexHashing.load(tmp_path / "broken.npz")


def test_hash_index_search_methods_agree(always_probe, monkeypatch):
    rng = np.random.default_rng(11)
    db = clustered_codes(rng, 3000, 24, classes=20, flip=0.1)
    query = clustered_codes(rng, 40, 24, classes=20, flip=0.1)
    index = HashIndex(codes=db, labels=np.zeros(len(db)), paths=[f"{i}.jpg" for i in range(3000)])
    expected_distances, expected_indices = brute_topk(query, db, 25)
    for method in ("scan", "multi_index"):
        paths, distances = index.search(query, 25, method=method)
        np.testing.assert_array_equal(distances, expected_distances)
        assert paths == [[f"{i}.jpg" for i in row] for row in expected_indices]
    assert index.multi_index() is index.multi_index()  # built once
    monkeypatch.setattr(hash_index, "_MIH_MIN_DB", 1000)  # "auto" picks the tables here
    assert prefer_multi_index(len(index), index.bits)
    _, distances = index.search(query, 25)
    np.testing.assert_array_equal(distances, expected_distances)
    with pytest.raises(ValueError, match="method must be"):
        index.search(query, 5, method="faiss")
