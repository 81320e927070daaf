"""Data: sources (one per dataset layout, plus the synthetic set) and the grain pipeline."""

from typing import Any

import ml_collections

from fdh_jax.data.decode import apply_bad_image_policy
from fdh_jax.data.sources import DatasetNotFoundError, make_source
from fdh_jax.data.synthetic import SyntheticFineGrained

__all__ = ["DatasetNotFoundError", "SyntheticFineGrained", "load_split", "make_source"]


def load_split(config: ml_collections.ConfigDict, split: str, *, check_images: bool = True) -> Any:
    """The source of `split` ("train" = database, "test" = query) that `config.data` describes.

    Real datasets are scanned for unreadable images first and handled per `data.bad_images`.
    """
    data = config.data
    if data.name == "synthetic":
        syn = data.synthetic
        return SyntheticFineGrained(
            split,
            num_classes=syn.num_classes,
            train_per_class=syn.train_per_class,
            test_per_class=syn.test_per_class,
            image_size=syn.image_size,
            seed=config.seed,
        )
    source = make_source(
        data.name, data.root, split, seed=config.seed, test_fraction=data.test_fraction
    )
    if check_images:
        source = apply_bad_image_policy(source, data.bad_images)
    return source
