"""Opening a dataset's splits as `config.data` describes them, scanned for unreadable images."""

import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from fdh_jax.data.image_scan import scan_splits
from fdh_jax.data.sources import make_source
from fdh_jax.data.synthetic import SyntheticFineGrained


def load_splits(
    config: ml_collections.ConfigDict,
    splits: Sequence[str] = ("train", "test"),
    *,
    check_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The sources of `splits` ("train" = database, "test" = query) that `config.data` describes.

    Real datasets are scanned for unreadable images first, all splits together, and handled per
    `data.bad_images`: under "error" one `BadImagesFoundError` lists the bad files of every split.
    The scan is cached (see `fdh_jax.data.image_scan`), so a restart does not decode again.

    Args:
      config: the run's config (`data.*` and `seed` are read).
      splits: which splits to open, in order.
      check_images: False to skip the scan (encode/search report a bad image when they meet it).
      cache_dir: where the scan is cached (default `image_scan.default_cache_dir()`).

    Returns:
      `{split: source}` in the order of `splits`.
    """
    data = config.data
    if data.name == "synthetic":
        syn = data.synthetic
        return {
            split: SyntheticFineGrained(
                split,
                num_classes=syn.num_classes,
                train_per_class=syn.train_per_class,
                test_per_class=syn.test_per_class,
                image_size=syn.image_size,
                seed=config.seed,
                class_backgrounds=syn.class_backgrounds,
            )
            for split in splits
        }
    sources = {
        split: make_source(
            data.name, data.root, split, seed=config.seed, test_fraction=data.test_fraction
        )
        for split in splits
    }
    if check_images:
        sources = scan_splits(sources, data.bad_images, cache_dir=cache_dir)
    return sources


def load_split(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    check_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> Any:
    """The source of one split: `load_splits(config, (split,), ...)[split]`.

    Prefer `load_splits` for both splits: its "error" lists the bad files of both at once.
    """
    return load_splits(config, (split,), check_images=check_images, cache_dir=cache_dir)[split]


def validation_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`(train_indices, validation_indices)`: a per-class, seeded hold-out of a database split.

    Each class with `n` images gives `round(fraction * n)` of them to validation (a random
    choice fixed by `(seed, class)`, so it does not change with the other classes), keeping at
    least one for training. Both index arrays are sorted; together they are `range(len(labels))`.
    """
    labels = np.asarray(labels)
    validation = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(int(np.floor(fraction * members.size + 0.5)), members.size - 1)
        if count > 0:
            rng = np.random.default_rng([seed, int(label)])
            validation.append(rng.choice(members, size=count, replace=False))
    held_out = np.sort(np.concatenate(validation)) if validation else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(labels.size), held_out)
    return train, held_out


def class_validation_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(train, queries, database)` indices: a seeded hold-out of whole classes.

    `round(fraction * C)` of the `C` classes (at least one left for training) are held out of
    training, a choice fixed by `seed`. Within each held-out class, `n // 2` of its `n` images
    (chosen by `(seed, class)`) are validation queries and the rest its validation database, so
    the validation scores retrieval among classes the model never trained on. `train` holds every
    image of the other classes. The three arrays are sorted and together `range(len(labels))`.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    count = min(int(np.floor(fraction * classes.size + 0.5)), classes.size - 1)
    held = (
        np.random.default_rng([seed, 0xC1A5]).choice(classes, size=count, replace=False)
        if count > 0
        else np.zeros(0, labels.dtype)
    )
    queries, database = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for label in np.sort(held):
        members = np.random.default_rng([seed, int(label)]).permutation(
            np.flatnonzero(labels == label)
        )
        queries.append(members[: members.size // 2])
        database.append(members[members.size // 2 :])
    queries, database = np.sort(np.concatenate(queries)), np.sort(np.concatenate(database))
    train = np.flatnonzero(~np.isin(labels, held))
    return train, queries, database
