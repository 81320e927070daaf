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

from pathlib import Path

from fdh_jax.data.sources.base import read_id_value_table
from fdh_jax.data.sources.opening import (
    DatasetFiles,
    ImageList,
    ListedSource,
    SourceOpener,
    first_folder_holding,
)

TFDS_NAME = "caltech_birds2011"
LAYOUT = """\
  ROOT/images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/<class>/
  (ROOT = the extracted CUB_200_2011/ folder, or its parent)
  or a TFDS data dir with a built caltech_birds2011/<version>/ (array_record)"""
HOW_TO_GET = (
    "download CUB_200_2011.tgz from the Caltech Vision Lab page for CUB-200-2011 "
    "(www.vision.caltech.edu/datasets/cub_200_2011, data.caltech.edu) and extract it"
)
FILES = DatasetFiles("cub", LAYOUT, HOW_TO_GET)


def find_extracted_root(root: Path) -> Path | None:
    """The folder holding images.txt: `root` or `root/CUB_200_2011`, or None."""
    return first_folder_holding("images.txt", (root, root / "CUB_200_2011"))


def read_image_tables(
    files: DatasetFiles, root: Path
) -> tuple[list[tuple[str, str]], dict[str, str], dict[str, str]]:
    """The per-image tables of the CUB format (NABirds uses it too), read in this order.

    Returns:
      image_rows: `(image id, path relative to images/)` in images.txt order.
      class_of_id: image id -> class id (image_class_labels.txt).
      is_train_of_id: image id -> "1" (train) or "0" (test) (train_test_split.txt).
    """
    image_rows = read_id_value_table(files.require(root / "images.txt"))
    class_of_id = dict(read_id_value_table(files.require(root / "image_class_labels.txt")))
    is_train_of_id = dict(read_id_value_table(files.require(root / "train_test_split.txt")))
    return image_rows, class_of_id, is_train_of_id


class CubSource(ListedSource):
    """The extracted CUB-200-2011 archive (layout 1 of the module docstring)."""

    dataset_files = FILES

    def read_lists(self, split: str) -> ImageList:
        """The images flagged for `split` in train_test_split.txt, in images.txt order."""
        image_rows, class_of_id, is_train_of_id = read_image_tables(FILES, self.root)
        class_rows = read_id_value_table(FILES.require(self.root / "classes.txt"))
        FILES.require(self.root / "images", is_dir=True)
        class_names = [name for _, name in sorted(class_rows, key=lambda row: int(row[0]))]
        want_train = "1" if split == "train" else "0"
        paths, labels = [], []
        for image_id, relative_path in image_rows:
            if image_id not in class_of_id or image_id not in is_train_of_id:
                raise ValueError(f"cub: image id {image_id} lacks a label or a split flag")
            if is_train_of_id[image_id] == want_train:
                paths.append(str(self.root / "images" / relative_path))
                labels.append(int(class_of_id[image_id]) - 1)
        return ImageList(paths, labels, class_names)


# The extracted archive if found, else a built TFDS copy.
open_source = SourceOpener(CubSource, find_extracted_root, TFDS_NAME, looked_for=("images.txt",))
