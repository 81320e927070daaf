"""Retrieval metrics against independent references: per-query NumPy loops, brute force over every
order of the distance ties, and hand-computed cases."""

import itertools

import numpy as np
import pytest

from fdh_jax.evaluation import metrics
from fdh_jax.evaluation.metrics import (
    mean_average_precision,
    precision_at_k,
    precision_recall_curve,
    precision_within_radius,
)
from fdh_jax.search.bits import InvalidCodesError, pack_codes


def random_codes(rng, n, bits):
    return np.where(rng.random((n, bits)) < 0.5, -1, 1).astype(np.int8)


def loop_distances(query, db_codes):
    return (db_codes.shape[1] - db_codes.astype(np.int64) @ query.astype(np.int64)) // 2


def loop_average_precision(relevant_in_order):
    """AP of a ranked 0/1 list, normalised by the relevant items in the list (0 if none)."""
    positions = np.flatnonzero(relevant_in_order) + 1
    if len(positions) == 0:
        return 0.0
    return float((np.arange(1, len(positions) + 1) / positions).mean())


def loop_map(query_codes, db_codes, query_labels, db_labels, topk=None):
    """The per-query loop as the peers write it, with a stable argsort."""
    aps = []
    for i in range(len(query_codes)):
        order = np.argsort(loop_distances(query_codes[i], db_codes), kind="stable")
        relevant = db_labels[order] == query_labels[i]
        aps.append(loop_average_precision(relevant[:topk]))
    return float(np.mean(aps))


def semicon_loop_map(query_codes, db_codes, query_labels, db_labels, topk=-1):
    """SEMICON utils/evaluate.py (`retrieval[argsort(dist)][:topk]`, topk=-1 by default), with
    ties ordered by database index, summed over queries and divided by num_query."""
    total = 0.0
    for i in range(len(query_codes)):
        order = np.argsort(loop_distances(query_codes[i], db_codes), kind="stable")
        retrieval = (db_labels[order] == query_labels[i]).astype(float)[:topk]
        count = int(retrieval.sum())
        if count == 0:
            continue
        score = np.linspace(1, count, count)
        index = np.flatnonzero(retrieval == 1) + 1.0
        total += (score / index).mean()
    return total / len(query_codes)


def brute_force_expected_ap(distances, relevant):
    """Mean AP over every ranking consistent with the distances (all tie orders equally likely)."""
    aps = []
    for order in itertools.permutations(range(len(distances))):
        if np.all(np.diff(distances[list(order)]) >= 0):
            aps.append(loop_average_precision(relevant[list(order)]))
    return float(np.mean(aps))


@pytest.fixture
def many_ties():
    rng = np.random.default_rng(0)
    cases = []
    for bits, num_db, num_query, num_classes in [
        (4, 300, 40, 5),
        (6, 700, 70, 25),
        (8, 257, 33, 6),
    ]:
        cases.append(
            (
                random_codes(rng, num_query, bits),
                random_codes(rng, num_db, bits),
                rng.integers(0, num_classes + 2, num_query),  # some classes absent from db
                rng.integers(0, num_classes, num_db),
            )
        )
    return cases


def test_hand_computed_case():
    # Query [+1, +1], label 0. Database distances 0, 1, 0, 2; labels 1, 0, 0, 0.
    query = np.array([[1, 1]], np.int8)
    db = np.array([[1, 1], [-1, 1], [1, 1], [-1, -1]], np.int8)
    query_labels, db_labels = np.array([0]), np.array([1, 0, 0, 0])
    # Index order: d0 (irrelevant), d2, d1, d3 -> relevant at ranks 2, 3, 4.
    assert mean_average_precision(query, db, query_labels, db_labels) == pytest.approx(
        (1 / 2 + 2 / 3 + 3 / 4) / 3
    )
    # Tie {d0, d2} in random order: precision of d2 is 1 or 1/2 -> 3/4 on average.
    assert mean_average_precision(
        query, db, query_labels, db_labels, tie_break="expected"
    ) == pytest.approx((3 / 4 + 2 / 3 + 3 / 4) / 3)
    # SEMICON drops the last-ranked item (d3).
    assert mean_average_precision(
        query, db, query_labels, db_labels, tie_break="semicon"
    ) == pytest.approx((1 / 2 + 2 / 3) / 2)
    # mAP@2: only d2 retrieved, at rank 2.
    assert mean_average_precision(query, db, query_labels, db_labels, topk=2) == pytest.approx(0.5)
    # mAP@1: no relevant item retrieved -> 0.
    assert mean_average_precision(query, db, query_labels, db_labels, topk=1) == 0.0


def test_index_ties_match_stable_argsort_loop(many_ties):
    for query_codes, db_codes, query_labels, db_labels in many_ties:
        ours = mean_average_precision(query_codes, db_codes, query_labels, db_labels)
        assert ours == pytest.approx(
            loop_map(query_codes, db_codes, query_labels, db_labels), 1e-12
        )
        for topk in (1, 10, 77):
            assert mean_average_precision(
                query_codes, db_codes, query_labels, db_labels, topk=topk
            ) == pytest.approx(
                loop_map(query_codes, db_codes, query_labels, db_labels, topk), 1e-12
            )


def test_tie_rule_matters(many_ties):
    # The reference itself must be sensitive to the tie order, or the test above proves nothing.
    query_codes, db_codes, query_labels, db_labels = many_ties[0]
    reverse = slice(None, None, -1)
    flipped = loop_map(query_codes, db_codes[reverse], query_labels, db_labels[reverse])
    assert flipped != pytest.approx(loop_map(query_codes, db_codes, query_labels, db_labels), 1e-6)
    assert mean_average_precision(
        query_codes, db_codes[reverse], query_labels, db_labels[reverse]
    ) == pytest.approx(flipped, 1e-12)


def test_blocked_and_accelerator_paths(many_ties, monkeypatch):
    query_codes, db_codes, query_labels, db_labels = many_ties[0]
    expected = loop_map(query_codes, db_codes, query_labels, db_labels)
    # Database in blocks of 64, histograms capped so chunks shrink to 1-2 queries.
    monkeypatch.setattr(metrics, "_DB_BLOCK", 64)
    monkeypatch.setattr(metrics, "_MAX_BINS", 200)
    assert mean_average_precision(query_codes, db_codes, query_labels, db_labels) == pytest.approx(
        expected, 1e-12
    )
    monkeypatch.setattr(metrics, "_DEVICE_HISTOGRAM", True)  # jitted scatter instead of bincount
    assert mean_average_precision(query_codes, db_codes, query_labels, db_labels) == pytest.approx(
        expected, 1e-12
    )


def test_packed_and_float_codes_give_the_same_map(many_ties):
    query_codes, db_codes, query_labels, db_labels = many_ties[2]
    expected = mean_average_precision(query_codes, db_codes, query_labels, db_labels)
    assert mean_average_precision(
        pack_codes(query_codes), pack_codes(db_codes), query_labels, db_labels
    ) == pytest.approx(expected, 1e-12)
    assert mean_average_precision(
        query_codes.astype(np.float32), db_codes.astype(np.int32), query_labels, db_labels
    ) == pytest.approx(expected, 1e-12)


def test_semicon_matches_its_loop(many_ties):
    for query_codes, db_codes, query_labels, db_labels in many_ties:
        assert mean_average_precision(
            query_codes, db_codes, query_labels, db_labels, tie_break="semicon"
        ) == pytest.approx(semicon_loop_map(query_codes, db_codes, query_labels, db_labels), 1e-12)
        assert mean_average_precision(
            query_codes, db_codes, query_labels, db_labels, tie_break="semicon", topk=20
        ) == pytest.approx(
            semicon_loop_map(query_codes, db_codes, query_labels, db_labels, 20), 1e-12
        )


def test_semicon_drop_last_changes_result_when_last_is_relevant():
    query = np.array([[1, 1, 1]], np.int8)
    db = np.array([[1, 1, 1], [-1, -1, -1]], np.int8)
    labels = np.array([0, 0])
    assert mean_average_precision(query, db, np.array([0]), labels) == 1.0
    assert mean_average_precision(query, db, np.array([0]), labels, tie_break="semicon") == 1.0
    labels = np.array([1, 0])  # the only relevant item is ranked last and gets dropped
    assert mean_average_precision(query, db, np.array([0]), labels) == 0.5
    assert mean_average_precision(query, db, np.array([0]), labels, tie_break="semicon") == 0.0


def test_expected_matches_brute_force_over_tie_orders():
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(12):
        bits, num_db = int(rng.integers(2, 4)), int(rng.integers(3, 8))
        query, db = random_codes(rng, 1, bits), random_codes(rng, num_db, bits)
        db_labels = rng.integers(0, 2, num_db)
        if not (db_labels == 0).any():
            continue
        ours = mean_average_precision(query, db, np.array([0]), db_labels, tie_break="expected")
        reference = brute_force_expected_ap(loop_distances(query[0], db), db_labels == 0)
        assert ours == pytest.approx(reference, abs=1e-12)
        checked += 1
    assert checked >= 8


def test_expected_is_between_best_and_worst_tie_orders(many_ties):
    query_codes, db_codes, query_labels, db_labels = many_ties[0]
    expected = mean_average_precision(
        query_codes, db_codes, query_labels, db_labels, tie_break="expected"
    )
    # Relevant items first / last inside each tie: sort by (distance, irrelevant/relevant).
    best, worst = [], []
    for i in range(len(query_codes)):
        distances = loop_distances(query_codes[i], db_codes)
        relevant = db_labels == query_labels[i]
        best.append(loop_average_precision(relevant[np.lexsort((~relevant, distances))]))
        worst.append(loop_average_precision(relevant[np.lexsort((relevant, distances))]))
    assert np.mean(worst) < expected < np.mean(best)


def test_perfect_and_unmatched_queries():
    db = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [-1, -1, -1, -1]], np.int8)
    db_labels = np.array([0, 0, 1])
    query = np.array([[1, 1, 1, 1], [1, -1, 1, 1]], np.int8)
    assert mean_average_precision(query, db, np.array([0, 0]), db_labels) == 1.0
    # Second query's class (7) is absent from the database: AP 0, still counted.
    assert mean_average_precision(query, db, np.array([0, 7]), db_labels) == 0.5


def test_bad_input_is_refused():
    rng = np.random.default_rng(0)
    query, db = random_codes(rng, 3, 8), random_codes(rng, 5, 8)
    labels_q, labels_db = np.zeros(3, int), np.zeros(5, int)
    with pytest.raises(InvalidCodesError, match="K=8.*K=6"):
        mean_average_precision(query, db[:, :6], labels_q, labels_db)
    with pytest.raises(InvalidCodesError, match="-1 and \\+1"):
        mean_average_precision(np.zeros((3, 8), np.int8), db, labels_q, labels_db)
    with pytest.raises(InvalidCodesError, match="dtype bool"):
        mean_average_precision(query > 0, db, labels_q, labels_db)
    with pytest.raises(ValueError, match="db_labels"):
        mean_average_precision(query, db, labels_q, labels_db[:4])
    with pytest.raises(ValueError, match="tie_break"):
        mean_average_precision(query, db, labels_q, labels_db, tie_break="random")
    with pytest.raises(ValueError, match="topk"):
        mean_average_precision(query, db, labels_q, labels_db, topk=0)
    with pytest.raises(ValueError, match="mAP@all only"):
        mean_average_precision(query, db, labels_q, labels_db, topk=3, tie_break="expected")


def test_precision_at_k_matches_loop(many_ties):
    for query_codes, db_codes, query_labels, db_labels in many_ties:
        for k in (1, 7, 50):
            hits, expected_hits = [], []
            for i in range(len(query_codes)):
                distances = loop_distances(query_codes[i], db_codes)
                relevant = db_labels == query_labels[i]
                hits.append(relevant[np.argsort(distances, kind="stable")[:k]].sum() / k)
                # Expected over tie orders: the tie at the k-th distance is sampled uniformly.
                kth = np.sort(distances)[k - 1]
                before, tie = distances < kth, distances == kth
                expected_hits.append(
                    (
                        (relevant & before).sum()
                        + (relevant & tie).sum() * (k - before.sum()) / tie.sum()
                    )
                    / k
                )
            args = (query_codes, db_codes, query_labels, db_labels, k)
            assert precision_at_k(*args) == pytest.approx(np.mean(hits), 1e-12)
            assert precision_at_k(*args, tie_break="expected") == pytest.approx(
                np.mean(expected_hits), 1e-12
            )


def test_precision_recall_curve_and_radius_match_loop(many_ties):
    for query_codes, db_codes, query_labels, db_labels in many_ties:
        bits = query_codes.shape[1]
        precision, recall = np.zeros(bits + 1), np.zeros(bits + 1)
        for i in range(len(query_codes)):
            distances = loop_distances(query_codes[i], db_codes)
            relevant = db_labels == query_labels[i]
            for radius in range(bits + 1):
                retrieved = distances <= radius
                hits = (retrieved & relevant).sum()
                precision[radius] += hits / retrieved.sum() if retrieved.any() else 0.0
                recall[radius] += hits / relevant.sum() if relevant.any() else 0.0
        ours_precision, ours_recall = precision_recall_curve(
            query_codes, db_codes, query_labels, db_labels
        )
        np.testing.assert_allclose(ours_precision, precision / len(query_codes), rtol=1e-12)
        np.testing.assert_allclose(ours_recall, recall / len(query_codes), rtol=1e-12)
        assert precision_within_radius(
            query_codes, db_codes, query_labels, db_labels, radius=2
        ) == pytest.approx(precision[2] / len(query_codes), 1e-12)
        assert ours_recall[-1] == pytest.approx(np.isin(query_labels, db_labels).mean())


def test_radius_precision_counts_empty_lookups_as_zero():
    query = np.array([[1, 1, 1, 1], [-1, -1, -1, -1]], np.int8)
    db = np.array([[1, 1, 1, 1], [1, 1, 1, -1]], np.int8)
    # Query 0 retrieves both (one relevant): 1/2. Query 1 retrieves nothing within 2: 0.
    assert precision_within_radius(query, db, np.array([0, 0]), np.array([0, 1])) == 0.25
