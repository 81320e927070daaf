"""Food-101: 101 classes, 75,750 train / 25,250 test images.

Layouts accepted for `root`, in this order:

1. the extracted archive: `root/meta/classes.txt` (one class per line; index = line order),
   `root/meta/train.txt` and `root/meta/test.txt` (`<class>/<image id>` per line) and
   `root/images/<class>/<image id>.jpg`; `root` may also be the folder containing `food-101/`;
2. a TFDS data dir holding a locally built `food101` (array_record); its `validation` split is
   the official test split.
"""

from __future__ import annotations

import os
from pathlib import Path

from fdh_jax.data.sources.base import (
    DatasetNotFoundError,
    ImageListSource,
    check_split,
    read_text_lines,
    require_path,
    resolve_root,
)
from fdh_jax.data.sources.tfds_source import TfdsSource, find_prepared_tfds

TFDS_NAME = "food101"
TFDS_SPLITS = {"train": "train", "test": "validation"}
LAYOUT = """\
  ROOT/meta/classes.txt, ROOT/meta/train.txt, ROOT/meta/test.txt, ROOT/images/<class>/<id>.jpg
  (ROOT = the extracted food-101/ folder, or its parent)
  or a TFDS data dir with a built food101/<version>/ (array_record)"""
HOW_TO_GET = (
    "download food-101.tar.gz from the ETH Zurich Food-101 page "
    "(data.vision.ee.ethz.ch/cvl/datasets_extra/food-101) and extract it"
)


def find_extracted_root(root: Path) -> Path | None:
    """The folder holding meta/classes.txt: `root` or `root/food-101`, or None."""
    for candidate in (root, root / "food-101"):
        if (candidate / "meta" / "classes.txt").is_file():
            return candidate
    return None


class Food101Source(ImageListSource):
    """The extracted Food-101 archive (layout 1 of the module docstring)."""

    def __init__(self, root: str | os.PathLike, split: str, *, expected_size: int | None = None):
        check_split(split)
        self.root = resolve_root(root)

        def require(relative: str) -> Path:
            return require_path("food101", self.root / relative, LAYOUT, HOW_TO_GET)

        class_names = read_text_lines(require("meta/classes.txt"))
        index_of_class = {name: i for i, name in enumerate(class_names)}
        list_file = require(f"meta/{split}.txt")
        require_path("food101", self.root / "images", LAYOUT, HOW_TO_GET, is_dir=True)
        paths, labels = [], []
        for line in read_text_lines(list_file):
            class_name = line.split("/", 1)[0]
            if class_name not in index_of_class:
                raise ValueError(f"{list_file}: class {class_name!r} is not in meta/classes.txt")
            paths.append(str(self.root / "images" / f"{line}.jpg"))
            labels.append(index_of_class[class_name])
        super().__init__(
            name="food101",
            split=split,
            paths=paths,
            labels=labels,
            class_names=class_names,
            expected_size=expected_size,
        )


def open_source(
    root: str | os.PathLike,
    split: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.5,
    expected_size: int | None = None,
) -> Food101Source | TfdsSource:
    """`make_source` entry: the extracted archive if found, else a built TFDS copy."""
    del seed, test_fraction
    resolved = resolve_root(root)
    extracted = find_extracted_root(resolved)
    if extracted is not None:
        return Food101Source(extracted, split, expected_size=expected_size)
    if find_prepared_tfds(resolved, TFDS_NAME) is not None:
        return TfdsSource(
            name="food101",
            tfds_name=TFDS_NAME,
            data_dir=resolved,
            split=check_split(split),
            tfds_split=TFDS_SPLITS[split],
            expected_size=expected_size,
        )
    missing = resolved if not resolved.is_dir() else resolved / "meta" / "classes.txt"
    raise DatasetNotFoundError("food101", missing, LAYOUT, HOW_TO_GET)
