"""Each loss against a NumPy reference written independently (loops where it is clearer)."""

import numpy as np
import pytest

from fdh_jax.training import losses


def _normalize(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-8)


def _log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    h = np.tanh(rng.normal(size=(8, 6))).astype(np.float32)
    h_bg = np.tanh(rng.normal(size=(8, 6))).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 1], np.int32)
    proxies = rng.choice([-1.0, 1.0], size=(4, 6)).astype(np.float32)
    return h, h_bg, labels, proxies


def test_proxy_loss_matches_numpy(batch):
    h, _, labels, proxies = batch
    scale, margin = 8.0, 0.3
    expected = []
    for i in range(len(h)):
        cos = np.array([_normalize(h[i]) @ _normalize(p) for p in proxies])
        cos[labels[i]] -= margin
        expected.append(-_log_softmax(scale * cos)[labels[i]])
    got = losses.proxy_loss(h, proxies, labels, scale=scale, margin=margin)
    np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)


def test_proxy_uniformity_matches_numpy(batch):
    *_, proxies = batch
    p = _normalize(proxies.astype(np.float64))
    terms = [
        np.exp(-2.0 * np.sum((p[i] - p[j]) ** 2))
        for i in range(len(p))
        for j in range(len(p))
        if i != j
    ]
    np.testing.assert_allclose(
        losses.proxy_uniformity(proxies, t=2.0), np.log(np.mean(terms)), rtol=1e-5
    )


def test_balance_and_quantization(batch):
    h, *_ = batch
    np.testing.assert_allclose(
        losses.bit_balance_loss(h), np.sum(h.mean(0) ** 2) / h.shape[1], rtol=1e-5
    )
    np.testing.assert_allclose(
        losses.quantization_loss(h), np.mean((np.abs(h) - 1) ** 2), rtol=1e-5
    )
    # Hand-computed: perfectly balanced binary codes cost nothing.
    codes = np.array([[1, -1], [-1, 1]], np.float32)
    assert float(losses.bit_balance_loss(codes)) == 0.0
    assert float(losses.quantization_loss(codes)) == 0.0


def _triplet_reference(h, labels, h_bg, margin):
    h = _normalize(h.astype(np.float64))
    class_terms, bg_terms = [], []
    for a in range(len(h)):
        pos = [
            np.linalg.norm(h[a] - h[p]) for p in range(len(h)) if p != a and labels[p] == labels[a]
        ]
        neg = [np.linalg.norm(h[a] - h[n]) for n in range(len(h)) if labels[n] != labels[a]]
        if not pos:
            continue
        if neg:
            class_terms.append(max(0.0, max(pos) - min(neg) + margin))
        if h_bg is not None:
            d_bg = np.linalg.norm(h[a] - _normalize(h_bg[a].astype(np.float64)))
            bg_terms.append(max(0.0, max(pos) - d_bg + margin))
    loss = np.mean(class_terms)
    return loss + (np.mean(bg_terms) if h_bg is not None else 0.0)


@pytest.mark.parametrize("with_background", [False, True])
def test_triplet_loss_matches_numpy(batch, with_background):
    h, h_bg, labels, _ = batch
    bg = h_bg if with_background else None
    got = losses.triplet_loss(h, labels, bg, margin=0.4)
    np.testing.assert_allclose(got, _triplet_reference(h, labels, bg, 0.4), rtol=1e-5)


def test_triplet_background_negative_is_active():
    # Positives coincide, class negatives are far: only the background term can be non-zero,
    # and it is exactly margin - d(anchor, own background).
    h = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]], np.float32)
    labels = np.array([0, 0, 1, 1])
    h_bg = np.array([[1.0, 0.1], [1.0, 0.1], [-1.0, -0.1], [-1.0, -0.1]], np.float32)
    d_bg = np.linalg.norm(_normalize(np.array([1.0, 0.1])) - np.array([1.0, 0.0]))
    got = losses.triplet_loss(h, labels, h_bg, margin=0.5)
    np.testing.assert_allclose(got, 0.5 - d_bg, rtol=1e-4)
    assert float(losses.triplet_loss(h, labels, None, margin=0.5)) == 0.0


def test_classification_loss_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 5)
    eps = 0.1
    expected = []
    for i in range(5):
        target = np.full(7, eps / 7)
        target[labels[i]] += 1 - eps
        expected.append(-np.sum(target * _log_softmax(logits[i])))
    got = losses.classification_loss(logits, labels, smoothing=eps)
    np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)


def _neighbourhood_numpy(h, teacher, temperature, labels=None):
    """Row by row: KL(p_i || q_i) over j != i (of another class when `labels` is given), p from
    centred teacher cosines, q from codes; rows with no candidate left out."""
    t = teacher.astype(np.float64) - teacher.mean(axis=0)
    t = t / np.sqrt(np.sum(t * t, axis=1, keepdims=True) + 1e-8)
    c = h.astype(np.float64) / np.sqrt(np.sum(h * h, axis=1, keepdims=True) + 1e-8)
    total, rows = 0.0, 0
    for i in range(len(h)):
        others = [j for j in range(len(h)) if j != i and (labels is None or labels[j] != labels[i])]
        if not others:
            continue
        rows += 1
        log_p = _log_softmax(np.array([t[i] @ t[j] for j in others]) / temperature)
        log_q = _log_softmax(np.array([c[i] @ c[j] for j in others]) / temperature)
        total += np.sum(np.exp(log_p) * (log_p - log_q))
    return total / max(rows, 1)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_neighbourhood_loss_matches_numpy(batch, temperature):
    h = batch[0]
    teacher = np.abs(np.random.default_rng(3).normal(size=(8, 5))).astype(np.float32)
    got = losses.neighbourhood_loss(h, teacher, temperature=temperature)
    np.testing.assert_allclose(got, _neighbourhood_numpy(h, teacher, temperature), rtol=1e-4)
    labels = batch[2]
    got = losses.neighbourhood_loss(h, teacher, labels, temperature=temperature)
    expected = _neighbourhood_numpy(h, teacher, temperature, labels)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_neighbourhood_loss_among_other_classes_by_hand():
    # Two classes of two images: each row has two candidates, the other class's images.
    teacher = np.array([[1, 0], [0.8, 0.6], [0, 1], [-0.6, 0.8]], np.float32) + 1.0
    h = np.array([[1, 0], [0, 1], [1, 1], [-1, 1]], np.float32)
    labels = np.array([0, 0, 1, 1])
    t = teacher - teacher.mean(axis=0)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    c = h / np.linalg.norm(h, axis=1, keepdims=True)
    expected = 0.0
    for i, (a, b) in enumerate([(2, 3), (2, 3), (0, 1), (0, 1)]):
        p = np.exp(10 * np.array([t[i] @ t[a], t[i] @ t[b]]))
        q = np.exp(10 * np.array([c[i] @ c[a], c[i] @ c[b]]))
        p, q = p / p.sum(), q / q.sum()
        expected += np.sum(p * np.log(p / q)) / 4
    got = losses.neighbourhood_loss(h, teacher, labels, temperature=0.1)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    one_class = np.zeros(4, np.int32)  # no pair of different classes: nothing to keep
    assert float(losses.neighbourhood_loss(h, teacher, one_class)) == 0.0


def test_neighbourhood_loss_is_zero_when_codes_share_the_teachers_geometry():
    teacher = np.random.default_rng(4).normal(size=(6, 4)).astype(np.float32)
    centred = teacher - teacher.mean(axis=0)
    assert abs(float(losses.neighbourhood_loss(centred, teacher))) < 1e-5
    # The same codes given to the wrong images (rows shifted by one) pay for it.
    assert float(losses.neighbourhood_loss(np.roll(centred, 1, axis=0), teacher)) > 0.5


def test_similarity_loss_matches_a_pair_loop(batch):
    h, _, labels, _ = batch
    teacher = np.abs(np.random.default_rng(5).normal(size=(8, 5))).astype(np.float32)
    t = teacher.astype(np.float64) - teacher.mean(axis=0)
    t /= np.sqrt(np.sum(t * t, axis=1, keepdims=True) + 1e-8)
    c = h.astype(np.float64) / np.sqrt(np.sum(h * h, axis=1, keepdims=True) + 1e-8)
    for pair_labels in (None, labels):
        gaps = [
            (c[i] @ c[j] - t[i] @ t[j]) ** 2
            for i in range(len(h))
            for j in range(len(h))
            if i != j and (pair_labels is None or pair_labels[i] != pair_labels[j])
        ]
        got = losses.similarity_loss(h, teacher, pair_labels)
        np.testing.assert_allclose(got, np.mean(gaps), rtol=1e-4)
    assert float(losses.similarity_loss(h, teacher, np.zeros(8, np.int32))) == 0.0


def test_similarity_loss_by_hand():
    # Centred teacher rows (1, 0), (-1, 0): cosine -1. Codes (1, 0), (1, 1): cosine 1/sqrt(2).
    teacher = np.array([[3.0, 2.0], [1.0, 2.0]], np.float32)
    h = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
    expected = (1 / np.sqrt(2) + 1) ** 2
    np.testing.assert_allclose(losses.similarity_loss(h, teacher), expected, rtol=1e-5)


def test_instance_loss_matches_a_loop():
    h = np.tanh(np.random.default_rng(7).normal(size=(6, 5))).astype(np.float32)
    c = h.astype(np.float64) / np.sqrt(np.sum(h * h, axis=1, keepdims=True) + 1e-8)
    terms = []
    for i in range(6):
        others = [j for j in range(6) if j != i]
        logits = np.array([c[i] @ c[j] / 0.5 for j in others])
        partner = i + 1 if i % 2 == 0 else i - 1
        log_z = np.log(np.sum(np.exp(logits)))
        terms.append(log_z - logits[others.index(partner)])
    got = losses.instance_loss(h, temperature=0.5)
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


def test_instance_loss_by_hand():
    # Two photos, two views each; views of a photo identical, the photos orthogonal: each row
    # sees cosines 1 (partner), 0, 0 at T = 1, so the loss is log(e + 2) - 1.
    h = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], np.float32)
    np.testing.assert_allclose(
        losses.instance_loss(h, temperature=1.0), np.log(np.e + 2) - 1, rtol=1e-6
    )
    swapped = h[[0, 2, 1, 3]]  # partners now orthogonal: worse
    assert float(losses.instance_loss(swapped, temperature=1.0)) > np.log(np.e + 2) - 1


def test_total_loss_switches(tiny):
    rng = np.random.default_rng(2)
    outputs = {
        "hash": {"8": np.tanh(rng.normal(size=(4, 8))).astype(np.float32)},
        "hash_background": {"8": np.tanh(rng.normal(size=(4, 8))).astype(np.float32)},
        "proxies": {"8": rng.choice([-1.0, 1.0], size=(2, 8)).astype(np.float32)},
        "class_logits": rng.normal(size=(4, 2)).astype(np.float32),
    }
    labels = np.array([0, 0, 1, 1])
    loss, parts = losses.total_loss(outputs, labels, tiny.loss)
    assert {
        "proxy_8",
        "triplet_8",
        "quantization_8",
        "balance_8",
        "uniformity",
        "classification",
    } == set(parts)
    np.testing.assert_allclose(loss, sum(float(v) for v in parts.values()), rtol=1e-6)
    outputs["pooled"] = np.abs(rng.normal(size=(4, 3))).astype(np.float32)
    tiny.loss.neighbourhood_weight = 0.5
    loss, parts = losses.total_loss(outputs, labels, tiny.loss)
    expected = losses.neighbourhood_loss(outputs["hash"]["8"], outputs["pooled"])
    np.testing.assert_allclose(parts["neighbourhood_8"], 0.5 * float(expected), rtol=1e-6)
    outputs["hash"]["4"] = np.tanh(rng.normal(size=(4, 4))).astype(np.float32)
    outputs["hash_background"]["4"] = np.tanh(rng.normal(size=(4, 4))).astype(np.float32)
    outputs["proxies"]["4"] = rng.choice([-1.0, 1.0], size=(2, 4)).astype(np.float32)
    tiny.loss.neighbourhood_bits = (8,)  # the term on the 8-bit codes only
    _, parts = losses.total_loss(outputs, labels, tiny.loss)
    assert "neighbourhood_8" in parts and "neighbourhood_4" not in parts and "proxy_4" in parts
    tiny.loss.neighbourhood_form = "cosine"  # every pair's cosine instead of the KL
    tiny.loss.neighbourhood_pairs = "other_classes"
    _, parts = losses.total_loss(outputs, labels, tiny.loss)
    expected = losses.similarity_loss(outputs["hash"]["8"], outputs["pooled"], labels)
    np.testing.assert_allclose(parts["neighbourhood_8"], 0.5 * float(expected), rtol=1e-6)
    tiny.loss.neighbourhood_form = "kl"
    tiny.loss.neighbourhood_pairs = "all"
    tiny.loss.neighbourhood_bits = ()
    tiny.loss.neighbourhood_weight = 0.0
    tiny.loss.instance_weight = 2.0
    _, parts = losses.total_loss(outputs, labels, tiny.loss)
    for k in ("4", "8"):
        expected = losses.instance_loss(outputs["hash"][k], temperature=0.2)
        np.testing.assert_allclose(parts[f"instance_{k}"], 2.0 * float(expected), rtol=1e-6)
    tiny.loss.instance_weight = 0.0
    tiny.loss.use_triplet = False
    tiny.loss.use_proxy = False
    _, parts = losses.total_loss(outputs, labels, tiny.loss)
    assert not any(k.startswith(("proxy", "triplet", "uniformity")) for k in parts)
