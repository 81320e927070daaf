"""Retrieval against brute force: packing, Hamming distance, exact top-k, the saved index."""

import json

import numpy as np
import pytest

from fdh_jax.search import scan
from fdh_jax.search.bits import IndexFileError, InvalidCodesError, pack_codes, unpack_codes
from fdh_jax.search.hash_index import _MIH_MIN_DB, HashIndex, prefer_multi_index, search_codes
from fdh_jax.search.multi_index import MultiIndexHashing
from fdh_jax.search.scan import hamming_distance, hamming_topk


def random_codes(rng, n, bits):
    return np.where(rng.random((n, bits)) < 0.5, -1, 1).astype(np.int8)


def brute_distances(query_codes, db_codes):
    return (query_codes.shape[1] - query_codes.astype(np.int64) @ db_codes.astype(np.int64).T) // 2


def brute_topk(query_codes, db_codes, k):
    distances = brute_distances(query_codes, db_codes)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, 1), order


@pytest.mark.parametrize("bits", [1, 7, 8, 12, 48, 64, 65])
def test_pack_unpack_round_trip(bits):
    codes = random_codes(np.random.default_rng(bits), 9, bits)
    packed = pack_codes(codes)
    assert packed.dtype == np.uint8 and packed.shape == (9, -(-bits // 8))
    np.testing.assert_array_equal(unpack_codes(packed, bits), codes)


def test_pack_bit_layout():
    codes = np.array([[1, -1, -1, -1, -1, -1, -1, 1, 1, -1]], np.int8)
    np.testing.assert_array_equal(pack_codes(codes), [[0b10000001, 0b10000000]])


@pytest.mark.parametrize("bits", [3, 32, 48, 70])
def test_hamming_distance_matches_brute_force(bits):
    rng = np.random.default_rng(bits)
    query, db = random_codes(rng, 13, bits), random_codes(rng, 301, bits)
    expected = brute_distances(query, db)
    ours = hamming_distance(query, db)
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(hamming_distance(pack_codes(query), pack_codes(db)), expected)


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize(
    "bits, num_db, num_query, k",
    [(6, 3000, 37, 10), (16, 9000, 20, 100), (4, 500, 5, 500), (64, 5000, 9, 1)],
)
def test_hamming_topk_matches_brute_force(monkeypatch, device_path, bits, num_db, num_query, k):
    # Small blocks so that the streaming / merging across blocks is exercised; few bits so that
    # ties at the k-th distance are everywhere.
    monkeypatch.setattr(scan, "_SCAN_BLOCK", 700)
    monkeypatch.setattr(scan, "_TOPK_BLOCK", 1024)
    monkeypatch.setattr(scan, "_DEVICE_TOPK", device_path)
    rng = np.random.default_rng(bits + num_db)
    query, db = random_codes(rng, num_query, bits), random_codes(rng, num_db, bits)
    distances, indices = hamming_topk(query, db, k)
    expected_distances, expected_indices = brute_topk(query, db, k)
    assert distances.dtype == np.int32 and indices.dtype == np.int32
    np.testing.assert_array_equal(distances, expected_distances)
    np.testing.assert_array_equal(indices, expected_indices)


@pytest.mark.parametrize("bits", [32, 48, 128, 130, 200])
def test_scan_topk_word_counts_and_tiny_tiles(monkeypatch, bits):
    # 1, 2 and 3-4 uint64 words take different vector loops; tiles of 100 items (not a multiple
    # of the 64-item sub-blocks) and groups of 3 queries leave partial tiles everywhere.
    monkeypatch.setattr(scan, "_SCAN_BLOCK", 100)
    monkeypatch.setattr(scan, "_SCAN_GROUP", 3)
    rng = np.random.default_rng(bits)
    db = random_codes(rng, 1500, bits)
    db[700:760] = db[5]  # exact duplicates: ties at distance 0 across tiles
    query = np.concatenate([db[[5, 9]], random_codes(rng, 6, bits)])
    for k in (1, 37, 260, 1500):
        distances, indices = hamming_topk(query, db, k)
        expected_distances, expected_indices = brute_topk(query, db, k)
        np.testing.assert_array_equal(distances, expected_distances)
        np.testing.assert_array_equal(indices, expected_indices)


def test_search_codes_rule_and_index():
    rng = np.random.default_rng(3)
    query, db = random_codes(rng, 7, 24), random_codes(rng, 400, 24)
    index = MultiIndexHashing(db)
    expected = brute_topk(query, db, 9)
    for result in (search_codes(query, db, 9), search_codes(query, db, 9, index=index)):
        np.testing.assert_array_equal(result[0], expected[0])
        np.testing.assert_array_equal(result[1], expected[1])
    with pytest.raises(ValueError, match="400"):
        search_codes(query, db[:300], 9, index=index)
    assert not prefer_multi_index(_MIH_MIN_DB - 1, 64)
    assert prefer_multi_index(_MIH_MIN_DB, 64)
    assert not prefer_multi_index(10**7, 256)


def test_hamming_topk_packed_input_and_bad_k():
    rng = np.random.default_rng(0)
    query, db = random_codes(rng, 4, 24), random_codes(rng, 50, 24)
    for a, b in zip(
        hamming_topk(pack_codes(query), pack_codes(db), 5), brute_topk(query, db, 5), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="k must be"):
        hamming_topk(query, db, 51)
    with pytest.raises(ValueError, match="k must be"):
        hamming_topk(query, db, 0)


def test_bad_codes_are_refused():
    rng = np.random.default_rng(0)
    query, db = random_codes(rng, 3, 16), random_codes(rng, 5, 16)
    with pytest.raises(InvalidCodesError, match="K=16.*K=12"):
        hamming_distance(query, db[:, :12])
    with pytest.raises(InvalidCodesError, match="dtype bool"):
        hamming_topk(query > 0, db, 2)
    with pytest.raises(InvalidCodesError, match="dtype uint16"):
        hamming_distance(query.astype(np.uint16), db)
    with pytest.raises(InvalidCodesError, match="-1 and \\+1"):
        hamming_topk(np.sign(query * 0.0), db, 2)
    with pytest.raises(InvalidCodesError, match="2-D"):
        hamming_distance(query[0], db)
    with pytest.raises(ValueError):  # InvalidCodesError is a ValueError
        pack_codes(np.array([[1, 2]]))


@pytest.fixture
def index():
    rng = np.random.default_rng(1)
    return HashIndex(
        codes=random_codes(rng, 40, 12),
        labels=rng.integers(0, 5, 40),
        paths=[f"images/cls{i % 5}/ïmg_{i}.jpg" for i in range(40)],
        checkpoint="/runs/cub/checkpoints/1000",
        config_json=json.dumps({"model": {"bits": [12]}}),
    )


def test_index_round_trip_and_search(tmp_path, index):
    path = tmp_path / "db.npz"
    index.save(path)
    loaded = HashIndex.load(path)
    np.testing.assert_array_equal(loaded.codes, index.codes)
    np.testing.assert_array_equal(loaded.labels, index.labels)
    assert loaded.paths == index.paths and loaded.bits == 12
    assert loaded.checkpoint == index.checkpoint and loaded.config_json == index.config_json
    query = index.codes[[3, 7]]
    paths, distances = loaded.search(query, 6)
    expected_distances, expected_indices = brute_topk(query, index.codes, 6)
    np.testing.assert_array_equal(distances, expected_distances)
    assert paths == [[index.paths[i] for i in row] for row in expected_indices]
    assert paths[0][0] == index.paths[3] and distances[0, 0] == 0
    assert len(loaded.search(query, 1000)[0][0]) == 40  # k is capped at the database size


def test_index_refuses_corruption(tmp_path, index):
    path = tmp_path / "db.npz"
    index.save(path)
    raw = bytearray(path.read_bytes())
    # Flip a byte in the middle of the archive (inside a stored array).
    raw[len(raw) // 2] ^= 0xFF
    corrupted = tmp_path / "corrupted.npz"
    corrupted.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match="corrupted.npz"):
        HashIndex.load(corrupted)
    # A well-formed archive whose contents no longer match the checksum.
    with np.load(path) as archive:
        fields = {name: archive[name] for name in archive.files}
    fields["labels"] = fields["labels"] + 1
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, **fields)
    with pytest.raises(IndexFileError, match="tampered.npz: checksum mismatch"):
        HashIndex.load(tampered)
    fields["format_version"] = np.array(99)
    future = tmp_path / "future.npz"
    np.savez(future, **fields)
    with pytest.raises(IndexFileError, match="future.npz: hash index format version 99"):
        HashIndex.load(future)
    not_an_index = tmp_path / "notes.npz"
    not_an_index.write_text("hello")
    with pytest.raises(IndexFileError, match="notes.npz"):
        HashIndex.load(not_an_index)
    with pytest.raises(ValueError, match="missing.npz"):
        HashIndex.load(tmp_path / "missing.npz")


def test_index_validates_its_fields(index):
    with pytest.raises(ValueError, match="one label and one path"):
        HashIndex(codes=index.codes, labels=index.labels[:3], paths=index.paths)
    with pytest.raises(InvalidCodesError):
        HashIndex(codes=index.codes * 0, labels=index.labels, paths=index.paths)
