"""The input pipeline: class-balanced batches, determinism, process sharding, resumption."""

import numpy as np

from fdh_jax.data import load_split
from fdh_jax.data.pipeline import class_balanced_indices, eval_dataset, iterate, train_dataset


def test_class_balanced_batch_has_p_classes_of_q_images():
    labels = np.repeat(np.arange(10), [5, 6, 7, 3, 9, 5, 5, 8, 6, 4])
    for step in range(5):
        idx = class_balanced_indices(labels, step, seed=0, classes_per_batch=4, images_per_class=3)
        groups = labels[idx].reshape(4, 3)
        assert len(set(groups[:, 0])) == 4
        assert np.all(groups == groups[:, :1])
        assert all(len(set(row)) == 3 for row in idx.reshape(4, 3))  # no repeats within a class
    same = class_balanced_indices(labels, 3, seed=0, classes_per_batch=4, images_per_class=3)
    np.testing.assert_array_equal(
        same, class_balanced_indices(labels, 3, seed=0, classes_per_batch=4, images_per_class=3)
    )


def test_two_views_per_image_pair_adjacent_slots():
    labels = np.repeat(np.arange(10), [5, 6, 7, 3, 9, 5, 5, 8, 6, 4])
    for step in range(5):
        idx = class_balanced_indices(
            labels, step, seed=0, classes_per_batch=4, images_per_class=4, views_per_image=2
        )
        groups = labels[idx].reshape(4, 4)
        assert len(set(groups[:, 0])) == 4 and np.all(groups == groups[:, :1])
        pairs = idx.reshape(8, 2)
        assert np.all(pairs[:, 0] == pairs[:, 1])  # each photo in slots 2k and 2k + 1
        assert all(len(set(row)) == 2 for row in pairs[:, 0].reshape(4, 2))  # two photos a class


class _StoredViews:
    """A stand-in for `StageMapViews`: view `v` of image `i` is the array `[i, v]`."""

    def __init__(self, labels, num_views):
        self.labels, self.num_views = np.asarray(labels), num_views

    def __len__(self):
        return len(self.labels)

    def view_inputs(self, index, view):
        return {"C4": np.array([index, view])}


def test_the_two_slots_of_a_photo_get_two_stored_views(tiny):
    tiny.train.classes_per_batch, tiny.train.images_per_class = 2, 4
    tiny.train.views_per_image = 2
    source = _StoredViews(np.repeat(np.arange(3), 5), num_views=3)
    batches = list(iterate(train_dataset(source, tiny, 6)))
    for batch in batches:
        images, views = batch["C4"][:, 0].reshape(4, 2), batch["C4"][:, 1].reshape(4, 2)
        assert np.all(images[:, 0] == images[:, 1]) and np.all(views[:, 0] != views[:, 1])
    seen = np.concatenate([b["C4"][:, 1] for b in batches])
    assert set(seen.tolist()) == {0, 1, 2}
    again = list(iterate(train_dataset(source, tiny, 6, first_step=3)))  # a resumed run
    np.testing.assert_array_equal(again[0]["C4"], batches[3]["C4"])


def test_small_classes_are_sampled_with_replacement():
    labels = np.array([0, 0, 1])
    idx = class_balanced_indices(labels, 0, seed=0, classes_per_batch=2, images_per_class=3)
    assert sorted(labels[idx].tolist()) == [0, 0, 0, 1, 1, 1]


def test_process_shards_make_up_the_global_batch(tiny):
    source = load_split(tiny, "train")
    whole = list(iterate(train_dataset(source, tiny, 3)))
    parts = [
        list(iterate(train_dataset(source, tiny, 3, process_index=p, process_count=2)))
        for p in (0, 1)
    ]
    for step in range(3):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                whole[step][key], np.concatenate([parts[0][step][key], parts[1][step][key]])
            )
    assert whole[0]["image"].shape == (8, 32, 32, 3) and whole[0]["image"].dtype == np.float32


def test_resumed_iterator_continues_exactly(tiny):
    source = load_split(tiny, "train")
    iterator = iterate(train_dataset(source, tiny, 5))
    next(iterator), next(iterator)
    state = iterator.get_state()
    rest = [next(iterator)["image"] for _ in range(3)]
    resumed = iterate(train_dataset(source, tiny, 5), state)
    for expected in rest:
        np.testing.assert_array_equal(next(resumed)["image"], expected)


def test_eval_batches_keep_dataset_order(tiny):
    source = load_split(tiny, "test")
    batches = list(eval_dataset(source, tiny, np.arange(len(source))))
    np.testing.assert_array_equal(
        np.concatenate([b["index"] for b in batches]), np.arange(len(source))
    )
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), source.labels)


def test_batches_from_a_step_do_not_depend_on_workers_or_threads(tiny):
    source = load_split(tiny, "train")
    whole = [b["image"] for b in iterate(train_dataset(source, tiny, 5))]
    tiny.data.num_threads, tiny.data.num_workers = 1, 1  # another input topology after a restart
    resumed = [b["image"] for b in iterate(train_dataset(source, tiny, 5, first_step=2))]
    assert len(resumed) == 3
    for got, expected in zip(resumed, whole[2:], strict=True):
        np.testing.assert_array_equal(got, expected)
