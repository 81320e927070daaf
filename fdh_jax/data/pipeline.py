"""The grain input pipeline: class-balanced training batches and ordered evaluation batches.

Training batches are a pure function of `(seed, step)`: the class-balanced sampler draws `P`
classes and `Q` images of each for step `step`, and the augmentation of slot `j` uses the random
stream `(seed, step, j)`. A grain `MapDataset` over global positions `step * B + j` therefore
gives the same batches on any number of processes and after any restart; each process reads only
its own slots of every global batch. The grain iterator state is saved with each checkpoint.

A source may hold its items' backbone stage maps precomputed (`fdh_jax.training.feature_cache`:
a frozen backbone): then a training example is one of the source's stored views of the image,
chosen by the same `(seed, step, slot)` stream (with `train.views_per_image=2`, the two slots of
a photo get two different views), and an evaluation example is the stored evaluation view.
Batches then carry the stage maps (`"C3"`, `"C4"`, ...) instead of `"image"`; `model_inputs`
gives the model its input either way.
"""

import functools
from collections.abc import Callable, Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from fdh_jax.data.transforms import eval_transform, train_transform


def class_balanced_indices(
    labels: np.ndarray,
    step: int,
    *,
    seed: int,
    classes_per_batch: int,
    images_per_class: int,
    views_per_image: int = 1,
) -> np.ndarray:
    """Source indices of global batch `step`: `P` distinct classes x `Q` images each.

    Classes are drawn without replacement (with replacement only if there are fewer than `P`),
    images of a class without replacement unless the class has fewer than `Q / V`. With
    `views_per_image` V = 2 each class gives `Q / 2` images, each in two adjacent slots
    (`2k`, `2k + 1`): the pairs of the instance term. Returns `[P * Q]` int64, grouped by class.
    """
    rng = np.random.default_rng([seed, 0x5A3D, step])
    classes = np.unique(labels)
    chosen = rng.choice(classes, classes_per_batch, replace=len(classes) < classes_per_batch)
    per_class = images_per_class // views_per_image
    batch = []
    for c in chosen:
        members = np.flatnonzero(labels == c)
        images = rng.choice(members, per_class, replace=len(members) < per_class)
        batch.append(np.repeat(images, views_per_image))
    return np.concatenate(batch)


class _TrainRecords:
    """Maps a global position `step * B + slot` to an augmented training example."""

    def __init__(self, source: Any, config: ml_collections.ConfigDict):
        self.source = source
        self.config = config
        self.labels = np.asarray(source.labels)
        self.batch_size = config.train.batch_size
        self.views_per_image = config.train.get("views_per_image", 1)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one entry per step in flight; freed with self
    def _batch(self, step: int) -> np.ndarray:
        return class_balanced_indices(
            self.labels,
            step,
            seed=self.config.seed,
            classes_per_batch=self.config.train.classes_per_batch,
            images_per_class=self.config.train.images_per_class,
            views_per_image=self.views_per_image,
        )

    def _stored_view(self, step: int, slot: int, rng: np.random.Generator) -> int:
        """The stored view of slot `slot`; the two slots of a pair get two different views."""
        num_views = self.source.num_views
        if self.views_per_image == 1:
            return int(rng.integers(num_views))
        pair = np.random.default_rng([self.config.seed, 0xA07, step, slot // 2])
        views = pair.choice(num_views, 2, replace=num_views < 2)
        return int(views[slot % 2])

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        step, slot = divmod(int(position), self.batch_size)
        index = int(self._batch(step)[slot])
        rng = np.random.default_rng([self.config.seed, 0xA06, step, slot])
        if hasattr(self.source, "view_inputs"):  # stored views of a frozen backbone's maps
            view = self._stored_view(step, slot, rng)
            return self.source.view_inputs(index, view) | {"label": self.labels[index]}
        record = self.source[index]
        data = self.config.data
        image = train_transform(
            record["image"],
            data.image_size,
            rng,
            crop_scale=tuple(data.crop_scale),
            horizontal_flip=data.horizontal_flip,
        )
        return {"image": image, "label": np.int32(record["label"])}


def train_dataset(
    source: Any,
    config: ml_collections.ConfigDict,
    num_steps: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    first_step: int = 0,
) -> grain.IterDataset:
    """This process's share of the class-balanced global batches of steps `first_step + 1` to
    `num_steps`.

    Each element is `{"image": float32 [b, S, S, 3], "label": int32 [b]}` with
    `b = batch_size / process_count`: slots `[p * b, (p + 1) * b)` of each global batch. A batch
    is a pure function of `(seed, step, slot)`, so a resumed run starts at its restored step
    with any `data.num_workers` / `data.num_threads` (no iterator state to restore).
    """
    global_batch = config.train.batch_size
    local_batch = global_batch // process_count
    offset = process_index * local_batch

    def position(i: int) -> int:
        step, slot = divmod(i, local_batch)
        return step * global_batch + offset + slot

    dataset = (
        grain.MapDataset.range(first_step * local_batch, num_steps * local_batch)
        .map(position)
        .map(_TrainRecords(source, config))
        .batch(local_batch, drop_remainder=True)
    )
    return _to_iter(dataset, config)


def eval_dataset(
    source: Any,
    config: ml_collections.ConfigDict,
    indices: np.ndarray,
    transform: Callable[[int, dict], dict] | None = None,
) -> grain.IterDataset:
    """Evaluation batches over `indices` of `source`, in order.

    Elements are `{"image": float32 [b, S, S, 3], "label": int32 [b], "index": int64 [b]}`, or
    the stage maps instead of `"image"` for a source that stores them (`source.model_inputs`);
    `transform(index, record) -> {name: array}` replaces either. The last batch may be short
    (callers pad it).
    """
    data = config.data
    if transform is None and hasattr(source, "model_inputs"):
        transform = lambda index, record: source.model_inputs(record)
    if transform is None:
        transform = lambda index, record: {
            "image": eval_transform(record["image"], data.image_size, data.eval_resize)
        }

    def load(index: int) -> dict[str, np.ndarray]:
        record = source[int(index)]
        inputs = transform(int(index), record)
        return inputs | {"label": np.int32(record["label"]), "index": np.int64(index)}

    dataset = (
        grain.MapDataset.source(np.asarray(indices, np.int64))
        .map(load)
        .batch(config.eval.batch_size, drop_remainder=False)
    )
    return _to_iter(dataset, config)


def _to_iter(dataset: grain.MapDataset, config: ml_collections.ConfigDict) -> grain.IterDataset:
    data = config.data
    # Elements are whole batches: threads build different batches, `prefetch` batches ahead.
    read = grain.ReadOptions(
        num_threads=data.num_threads, prefetch_buffer_size=max(data.prefetch, data.num_threads)
    )
    iter_dataset = dataset.to_iter_dataset(read)
    if data.num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags: a library caller
            flags.FLAGS.mark_as_parsed()  # (not `python -m fdh_jax.main`) has not parsed them
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=data.num_workers)
        )
    return iter_dataset


def model_inputs(batch: dict) -> Any:
    """The model's input in a batch: `batch["image"]`, or the dict of precomputed stage maps."""
    if "image" in batch:
        return batch["image"]
    return {k: v for k, v in batch.items() if k not in _NOT_INPUTS}


_NOT_INPUTS = ("label", "index", "position")


def iterate(dataset: grain.IterDataset, state: dict | None = None) -> Iterator:
    """An iterator over `dataset`, fast-forwarded to a saved `get_state()` if given."""
    iterator = iter(dataset)
    if state is not None:
        iterator.set_state(state)
    return iterator
