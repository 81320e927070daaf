"""The synthetic fine-grained set: deterministic, and classes differ only in small parts."""

import numpy as np

from fdh_jax.data.synthetic import SyntheticFineGrained, render_bird


def test_deterministic_and_split_disjoint():
    a = SyntheticFineGrained("train", num_classes=4, train_per_class=3, image_size=32, seed=1)
    b = SyntheticFineGrained("train", num_classes=4, train_per_class=3, image_size=32, seed=1)
    test = SyntheticFineGrained("test", num_classes=4, test_per_class=2, image_size=32, seed=1)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.dtype == np.uint8 and a.images.shape == (12, 32, 32, 3)
    np.testing.assert_array_equal(a.labels, np.repeat(np.arange(4), 3))
    assert len(test) == 8
    assert not any(np.array_equal(x, y) for x in a.images for y in test.images)
    record = a[5]
    assert record["label"] == 1 and record["path"] == a.paths[5]


def test_classes_differ_only_in_a_small_part():
    size = 64
    images = [render_bird(label, size, np.random.default_rng(7)) for label in range(16)]
    for i in range(16):
        for j in range(i + 1, 16):
            changed = np.any(images[i] != images[j], axis=-1).mean()
            # Same random stream: the scene, the pose and the body are identical; only the
            # head and/or the wing change, a few percent of the pixels.
            assert 0 < changed < 0.08, (i, j, changed)
