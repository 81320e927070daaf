"""Multi-index hashing over a mask of live items, and its range search (`pairs_within`), against
an independent NumPy reference (XOR of packed bits, popcount by np.unpackbits)."""

import math

import numpy as np
import pytest

from fdh_jax.search import multi_index
from fdh_jax.search.multi_index import MultiIndexHashing

# (K, num_tables): K over {12, ..., 128}; one table; default tables; and tables of 24 to 32 bits
# over a few hundred codes, which take the sparse layout (sorted keys, binary search).
LAYOUTS = [
    (12, 1),
    (12, 3),
    (24, 2),
    (32, 1),
    (48, 2),
    (64, None),
    (64, 3),
    (100, 4),
    (128, 5),
    (128, 4),
]


def reference_distances(query_codes, db_codes):
    """`[Q, N]` Hamming distances: per query, XOR with every packed code and count the bits."""
    query_bytes = np.packbits(query_codes > 0, axis=1)
    db_bytes = np.packbits(db_codes > 0, axis=1)
    return np.stack([np.unpackbits(row ^ db_bytes, axis=1).sum(1) for row in query_bytes])


def reference_topk(query_codes, db_codes, k, alive):
    """Per query the k live codes smallest by (distance, database index)."""
    live = np.flatnonzero(alive)
    distances = reference_distances(query_codes, db_codes)[:, live]
    order = np.stack([np.lexsort((live, row))[:k] for row in distances])
    return np.take_along_axis(distances, order, 1), live[order]


def reference_pairs(db_codes, radius, alive):
    """All live pairs i < j within radius, in (i, j) order, with their distances."""
    distances = reference_distances(db_codes, db_codes)
    live = alive[:, None] & alive[None, :]
    first, second = np.nonzero(np.triu((distances <= radius) & live, 1))
    return first, second, distances[first, second]


def random_codes(rng, n, bits):
    return np.where(rng.random((n, bits)) < 0.5, -1, 1).astype(np.int8)


def clustered_codes(rng, n, bits, centres=4, flip=0.04):
    """Codes around a few centres with a few bits flipped, some repeated exactly: crowded
    buckets and many ties."""
    base = random_codes(rng, centres, bits)
    codes = base[rng.integers(centres, size=n)] * np.where(rng.random((n, bits)) < flip, -1, 1)
    codes[: n // 10] = codes[n // 10 : 2 * (n // 10)]  # exact duplicates
    return codes.astype(np.int8)


def make_codes(kind, seed, n, bits):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return random_codes(rng, n, bits)
    return clustered_codes(rng, n, bits)


def masks(rng, n, k):
    """Live-item masks: half, a tenth, all, exactly k (the k-th one, chosen at random)."""
    exactly_k = np.zeros(n, bool)
    exactly_k[rng.choice(n, k, replace=False)] = True
    return {
        "half": rng.random(n) < 0.5,
        "tenth": rng.random(n) < 0.1,
        "all": np.ones(n, bool),
        "exactly_k": exactly_k,
    }


@pytest.fixture
def always_probe(monkeypatch):
    """No work budget: every query is answered by probing, none by the linear scan."""
    monkeypatch.setattr(multi_index, "_WORK_PER_ITEM", 1e12)


def check_search(index, query, db, k, alive, probed=True):
    distances, indices = index.search(query, k, alive=alive)
    expected_distances, expected_indices = reference_topk(query, db, k, alive)
    assert distances.dtype == np.int32 and indices.dtype == np.int32
    np.testing.assert_array_equal(distances, expected_distances)
    np.testing.assert_array_equal(indices, expected_indices)
    assert np.all(alive[indices])
    if probed:
        assert index.last_search_stats["answered_by_probing"] == len(query)
    assert index.last_search_stats["live_items"] == alive.sum()


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("bits, num_tables", LAYOUTS)
def test_masked_search_equals_reference(monkeypatch, kind, bits, num_tables):
    rng = np.random.default_rng(bits)
    db = make_codes(kind, bits, 500, bits)
    # Database rows (live and dead ones: a dead exact match must not be returned) and new codes.
    query = np.concatenate([db[[0, 1, 60, 250]], make_codes(kind, bits + 1, 4, bits)])
    index = MultiIndexHashing(db, num_tables=num_tables)
    if num_tables in (1, 2, 4) and bits >= 32:
        assert not index.dense.any()  # the sparse layout
    # Substrings of <= 16 bits: every query is probed, however far its k-th live code. Longer
    # ones: a budget of ~ 20,000 probes per query (a k-th code across clusters would need
    # millions); the queries over it take the masked linear scan, the others are probed.
    short = np.diff(index.bounds).max() <= 16
    monkeypatch.setattr(multi_index, "_WORK_PER_ITEM", 1e12 if short else 1e4)
    probed = 0
    for name, alive in masks(rng, len(db), 9).items():
        live = int(alive.sum())
        for k in sorted({1, 9, min(live, 40), live} if name != "all" else {1, 9, 40}):
            check_search(index, query, db, k, alive, probed=short)
            probed += index.last_search_stats["answered_by_probing"]
    assert probed > 0


def test_all_live_mask_equals_no_mask(always_probe):
    rng = np.random.default_rng(7)
    db = clustered_codes(rng, 800, 64)
    query = clustered_codes(rng, 10, 64)
    index = MultiIndexHashing(db)
    unmasked = index.search(query, 30)
    masked = index.search(query, 30, alive=np.ones(len(db), bool))
    for a, b in zip(unmasked, masked, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("budget", [0.0, 0.05])
def test_masked_fallback_scan_is_exact(monkeypatch, budget):
    # Budget 0: every query goes to the linear scan over the live codes; 0.05: some do.
    rng = np.random.default_rng(3)
    db = clustered_codes(rng, 1500, 64, centres=8, flip=0.08)
    query = np.concatenate([db[:10], clustered_codes(rng, 30, 64, centres=8, flip=0.08)])
    monkeypatch.setattr(multi_index, "_WORK_PER_ITEM", budget)
    monkeypatch.setattr(multi_index, "_PILOT_QUERIES", 8)
    index = MultiIndexHashing(db, num_tables=4)
    for alive in masks(rng, len(db), 25).values():
        check_search(index, query, db, 25, alive, probed=False)
        stats = index.last_search_stats
        if budget == 0.0:
            assert stats["answered_by_scan"] == len(query)
        assert stats["answered_by_probing"] + stats["answered_by_scan"] == len(query)


def test_mask_and_k_validation():
    rng = np.random.default_rng(4)
    db = random_codes(rng, 50, 24)
    index = MultiIndexHashing(db)
    query = db[:2]
    for bad in (np.ones(50, np.uint8), np.ones(49, bool), np.ones((50, 1), bool), [1] * 50):
        with pytest.raises(ValueError, match=r"alive must be a bool array of shape \(50,\)"):
            index.search(query, 1, alive=bad)
        with pytest.raises(ValueError, match="alive must be"):
            index.pairs_within(2, alive=bad)
    alive = np.zeros(50, bool)
    alive[[3, 7]] = True
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 2\] \(live"):
        index.search(query, 3, alive=alive)
    with pytest.raises(ValueError, match="k must be"):
        index.search(query, 0, alive=alive)
    with pytest.raises(ValueError, match=r"\[1, 0\]"):
        index.search(query, 1, alive=np.zeros(50, bool))
    distances, indices = index.search(query, 2, alive=alive)
    np.testing.assert_array_equal(indices[:, 0] != indices[:, 1], True)
    assert set(indices.ravel()) == {3, 7}
    assert index.search(query, 2, alive=list(alive))[1].shape == (2, 2)  # a list of bools works


def check_pairs(index, db, radius, alive):
    first, second, distances = index.pairs_within(radius, alive=alive)
    expected = reference_pairs(db, radius, np.ones(len(db), bool) if alive is None else alive)
    for ours, theirs in zip((first, second, distances), expected, strict=True):
        assert ours.dtype == np.int64
        np.testing.assert_array_equal(ours, theirs)
    return len(first)


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("bits, num_tables", LAYOUTS)
def test_pairs_within_equals_reference(kind, bits, num_tables):
    rng = np.random.default_rng(bits + 100)
    db = make_codes(kind, bits + 2, 300, bits)
    db[290:] = db[:10] * np.where(rng.random((10, bits)) < 1.5 / bits, -1, 1)  # near pairs
    index = MultiIndexHashing(db, num_tables=num_tables)
    m = index.num_tables
    radii = sorted({0, 1, 2, 3, m - 1, m, m + 1, 2 * m + 1, 6, bits} & set(range(bits + 1)))
    # Radii whose probing pays against all 300 x 299 / 2 pairs only roughly, as a caller would
    # choose (bits: every pair, for the 12-bit layouts).
    radii = [r for r in radii if index.range_probe_cost(r) <= 6000]
    found = 0
    for radius in radii:
        found += check_pairs(index, db, radius, None)
        found += check_pairs(index, db, radius, rng.random(len(db)) < 0.6)
    assert found > 0


def test_pairs_within_edge_masks_and_radius_checks():
    rng = np.random.default_rng(9)
    db = clustered_codes(rng, 200, 32)
    index = MultiIndexHashing(db, num_tables=3)
    assert check_pairs(index, db, 4, np.zeros(200, bool)) == 0
    assert check_pairs(index, db, np.int64(4), None) > 0
    one = np.zeros(200, bool)
    one[5] = True
    assert check_pairs(index, db, 32, one) == 0
    assert check_pairs(index, db, 32, np.ones(200, bool)) == 200 * 199 // 2
    for bad in (-1, 33, 2.5, 3.0, True, None, "3"):
        with pytest.raises(ValueError, match=r"radius must be an integer in \[0, 32\]"):
            index.pairs_within(bad)
    with pytest.raises(ValueError, match="radius must be"):
        index.range_probe_cost(33)


def test_range_probe_cost():
    db = random_codes(np.random.default_rng(0), 100, 64)
    index = MultiIndexHashing(db, num_tables=4)  # 4 substrings of 16 bits
    # radius = 4 rho + 3: every table at rho.
    assert index.range_probe_cost(3) == 4
    assert index.range_probe_cost(7) == 4 * (1 + 16)
    assert index.range_probe_cost(11) == 4 * (1 + 16 + math.comb(16, 2))
    # radius 5 = 4 * 1 + 1: tables 0, 1 at radius 1, tables 2, 3 at radius 0.
    assert index.range_probe_cost(5) == 2 * 17 + 2 * 1
    assert index.range_probe_cost(0) == 1  # only table 0's own bucket
    # radius 64 = 4 * 16: table 0 at 16 (all its buckets), the others at 15.
    assert index.range_probe_cost(64) == 2**16 + 3 * (2**16 - 1)
    assert not index.range_probe_pays(11)  # 100 codes: all pairs are cheaper
    larger = MultiIndexHashing(random_codes(np.random.default_rng(1), 3000, 64), num_tables=8)
    assert larger.range_probe_pays(3) and not larger.range_probe_pays(16)
