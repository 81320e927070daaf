"""CUB-200-2011 (Caltech-UCSD Birds): 200 classes, 5,994 train / 5,794 test images.

Layouts accepted for `root`, in this order:

1. the extracted archive: `root/images.txt` (`<id> <class folder>/<file>`),
   `root/image_class_labels.txt` (`<id> <class 1..200>`), `root/train_test_split.txt`
   (`<id> <1 = train, 0 = test>`), `root/classes.txt` (`<class> <name>`), `root/images/`;
   `root` may also be the folder that contains `CUB_200_2011/`;
2. a TFDS data dir holding a locally built `caltech_birds2011` (array_record), read with
   `tfds.data_source` (never downloaded).

Labels in the files are 1-based; sources use 0..199.
"""

from __future__ import annotations

import os
from pathlib import Path

from fdh_jax.data.sources.base import (
    DatasetNotFoundError,
    ImageListSource,
    check_split,
    read_id_value_table,
    require_path,
    resolve_root,
)
from fdh_jax.data.sources.tfds_source import TfdsSource, find_prepared_tfds

TFDS_NAME = "caltech_birds2011"
LAYOUT = """\
  ROOT/images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/<class>/
  (ROOT = the extracted CUB_200_2011/ folder, or its parent)
  or a TFDS data dir with a built caltech_birds2011/<version>/ (array_record)"""
HOW_TO_GET = (
    "download CUB_200_2011.tgz from the Caltech Vision Lab page for CUB-200-2011 "
    "(www.vision.caltech.edu/datasets/cub_200_2011, data.caltech.edu) and extract it"
)


def find_extracted_root(root: Path) -> Path | None:
    """The folder holding images.txt: `root` or `root/CUB_200_2011`, or None."""
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    return None


class CubSource(ImageListSource):
    """The extracted CUB-200-2011 archive (layout 1 of the module docstring)."""

    def __init__(self, root: str | os.PathLike, split: str, *, expected_size: int | None = None):
        check_split(split)
        self.root = resolve_root(root)

        def require(file_name: str) -> Path:
            return require_path("cub", self.root / file_name, LAYOUT, HOW_TO_GET)

        image_rows = read_id_value_table(require("images.txt"))
        class_of_id = dict(read_id_value_table(require("image_class_labels.txt")))
        is_train_of_id = dict(read_id_value_table(require("train_test_split.txt")))
        class_rows = read_id_value_table(require("classes.txt"))
        require_path("cub", self.root / "images", LAYOUT, HOW_TO_GET, is_dir=True)
        class_names = [name for _, name in sorted(class_rows, key=lambda row: int(row[0]))]
        want_train = "1" if split == "train" else "0"
        paths, labels = [], []
        for image_id, relative_path in image_rows:
            if image_id not in class_of_id or image_id not in is_train_of_id:
                raise ValueError(f"cub: image id {image_id} lacks a label or a split flag")
            if is_train_of_id[image_id] == want_train:
                paths.append(str(self.root / "images" / relative_path))
                labels.append(int(class_of_id[image_id]) - 1)
        super().__init__(
            name="cub",
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
) -> CubSource | TfdsSource:
    """`make_source` entry: the extracted archive if found, else a built TFDS copy."""
    del seed, test_fraction
    resolved = resolve_root(root)
    extracted = find_extracted_root(resolved)
    if extracted is not None:
        return CubSource(extracted, split, expected_size=expected_size)
    if find_prepared_tfds(resolved, TFDS_NAME) is not None:
        return TfdsSource(
            name="cub",
            tfds_name=TFDS_NAME,
            data_dir=resolved,
            split=split,
            tfds_split=split,
            expected_size=expected_size,
        )
    missing: Path = resolved if not resolved.is_dir() else resolved / "images.txt"
    raise DatasetNotFoundError("cub", missing, LAYOUT, HOW_TO_GET)
