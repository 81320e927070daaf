"""Dataset sources: one module per on-disk layout, and `make_source`, the public entry point.

Every source follows the contract in `fdh_jax.data.sources.base` (lazy decoding, `labels` known
without decoding). `make_source(name, root, split)` picks the module for `name`; the
`synthetic` set is not a disk layout and is routed by `fdh_jax.data`, not here.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from fdh_jax.data.sources.base import (
    PUBLISHED_SPLIT_SIZES,
    DatasetNotFoundError,
    ImageListSource,
    SplitSizeMismatchError,
    check_split,
)

# name -> module in this package defining `open_source(root, split, *, seed, test_fraction,
# expected_size)`.
SOURCE_MODULES = {
    "cub": "cub",
    "aircraft": "aircraft",
    "nabirds": "nabirds",
    "food101": "food101",
    "dogs": "dogs",
    "cars": "cars",
    "vegfru": "vegfru",
    "folder": "folder",
}

__all__ = [
    "PUBLISHED_SPLIT_SIZES",
    "SOURCE_MODULES",
    "DatasetNotFoundError",
    "ImageListSource",
    "SplitSizeMismatchError",
    "make_source",
]


def make_source(
    name: str,
    root: str | os.PathLike,
    split: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.5,
    check_counts: bool = True,
) -> Any:
    """Opens split `split` of dataset `name` stored under `root`.

    Args:
      name: one of `SOURCE_MODULES` (cub, aircraft, nabirds, food101, dogs, cars, vegfru, folder).
      root: the dataset folder (each module's docstring lists the layouts it accepts).
      split: "train" (the retrieval database) or "test" (the queries).
      seed, test_fraction: the per-class split of `folder` when it has no split.csv.
      check_counts: compare the split size with the published one (PUBLISHED_SPLIT_SIZES) and
        raise `SplitSizeMismatchError` on a mismatch; `folder` has no published size.

    Returns:
      a source: `len`, `source[i] -> {"image": uint8 [H, W, 3], "label": int, "path": str}`,
      `labels: int32 [N]`, `paths`, `class_names`, `num_classes`, `name`, `split`.

    Raises:
      ValueError: unknown `name` or `split`, or an empty `root`.
      DatasetNotFoundError: `root` or a list file is missing.
    """
    if name not in SOURCE_MODULES:
        raise ValueError(
            f"unknown dataset {name!r}; valid names: {', '.join(sorted(SOURCE_MODULES))} "
            "(and 'synthetic', handled by fdh_jax.data)"
        )
    check_split(split)
    if not os.fspath(root).strip():
        raise ValueError(f"no root given for dataset {name!r}: set --config.data.root=DIR")
    expected_size = PUBLISHED_SPLIT_SIZES.get(name, {}).get(split) if check_counts else None
    module = importlib.import_module(f"{__name__}.{SOURCE_MODULES[name]}")
    return module.open_source(
        root, split, seed=seed, test_fraction=test_fraction, expected_size=expected_size
    )
