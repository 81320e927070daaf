"""Food-101: 101 classes, 75,750 train / 25,250 test images.

Layouts accepted for `root`, in this order:

1. the extracted archive: `root/meta/classes.txt` (one class per line; index = line order),
   `root/meta/train.txt` and `root/meta/test.txt` (`<class>/<image id>` per line) and
   `root/images/<class>/<image id>.jpg`; `root` may also be the folder containing `food-101/`;
2. a TFDS data dir holding a locally built `food101` (array_record); its `validation` split is
   the official test split.
"""

from __future__ import annotations

from pathlib import Path

from fdh_jax.data.sources.base import read_text_lines
from fdh_jax.data.sources.opening import (
    DatasetFiles,
    ImageList,
    ListedSource,
    SourceOpener,
    first_folder_holding,
)

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
FILES = DatasetFiles("food101", LAYOUT, HOW_TO_GET)


def find_extracted_root(root: Path) -> Path | None:
    """The folder holding meta/classes.txt: `root` or `root/food-101`, or None."""
    return first_folder_holding("meta/classes.txt", (root, root / "food-101"))


class Food101Source(ListedSource):
    """The extracted Food-101 archive (layout 1 of the module docstring)."""

    dataset_files = FILES

    def read_lists(self, split: str) -> ImageList:
        """The images listed in meta/<split>.txt; the class is the part before the "/"."""
        class_names = read_text_lines(FILES.require(self.root / "meta/classes.txt"))
        index_of_class = {name: i for i, name in enumerate(class_names)}
        list_file = FILES.require(self.root / f"meta/{split}.txt")
        FILES.require(self.root / "images", is_dir=True)
        paths, labels = [], []
        for line in read_text_lines(list_file):
            class_name = line.split("/", 1)[0]
            if class_name not in index_of_class:
                raise ValueError(f"{list_file}: class {class_name!r} is not in meta/classes.txt")
            paths.append(str(self.root / "images" / f"{line}.jpg"))
            labels.append(index_of_class[class_name])
        return ImageList(paths, labels, class_names)


# The extracted archive if found, else a built TFDS copy (its "validation" split is our "test").
open_source = SourceOpener(
    Food101Source, find_extracted_root, TFDS_NAME, TFDS_SPLITS, looked_for=("meta/classes.txt",)
)
